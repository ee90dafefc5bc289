"""Metric learning: embeddings in which samples of one identity lie close and others far apart.

Plain PyTorch (no mmengine). Every loss L2-normalises its embeddings (N, D) and takes int64
labels (N,); any N >= 0 works (a batch with nothing to learn from gives a zero loss that still
has a gradient).

- ``triplet_loss`` (mining 'all' / 'semihard' / 'hard' / 'batch-hard' / 'facenet', optional
  ``synthesis='symmetrical'``), ``contrastive_loss``, ``npair_loss``, ``ArcFaceLoss``,
  ``SiameseBinaryHead`` + ``siamese_binary_loss``
- ``symmetrical_synthesis``: the synthetic points of Gu & Ko 2020, for any loss
- ``evaluation``: retrieval (Recall@K, precision@1, R-precision, MAP@R), clustering (NMI, F1),
  verification (10-fold accuracy, TAR at FAR 1e-3)

Module map: distance.py (inputs, normalisation, distances), miners.py (mining as masks),
synthesis.py, triplet.py, pair_losses.py (contrastive, N-pair), arcface.py, siamese.py,
evaluation.py.
"""
from .arcface import ArcFaceLoss
from .distance import normalize, pairwise_distance
from .evaluation import clustering_metrics, retrieval_metrics, verification_metrics, verification_pairs
from .pair_losses import contrastive_loss, npair_loss
from .siamese import SiameseBinaryHead, siamese_binary_loss
from .synthesis import SymmetricalPairs, reflect, symmetrical_synthesis
from .triplet import MINING, triplet_loss

__all__ = [
    "ArcFaceLoss", "MINING", "SiameseBinaryHead", "SymmetricalPairs", "clustering_metrics",
    "contrastive_loss", "normalize", "npair_loss", "pairwise_distance", "reflect",
    "retrieval_metrics", "siamese_binary_loss", "symmetrical_synthesis", "triplet_loss",
    "verification_metrics", "verification_pairs",
]
