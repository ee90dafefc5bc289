"""One-shot recognition with the embedding branch: a gallery of identities, each enrolled from one
(or a few) examples, and the verification threshold beyond which a detection is ``unknown``.

Legend: M enrolled examples, K identities, D the embedding dimension, k detections.

    gallery = Gallery.load('gallery.pt')
    names, dist = gallery.identify(result['embeddings'])   # result from inference_detector
    # names[i]: the identity of detection i's nearest enrolled example, or 'unknown' when that
    # distance is above gallery.threshold; dist[i]: the distance (unit vectors: 0 .. 2)

The threshold is chosen on held-out examples (examples of enrolled identities that were not
enrolled), FaceNet's verification on pairs: each held-out example against its own identity (a
same pair) and against its nearest other identity (a different pair: the impostor that would
take it), the distance to an identity being that to its nearest enrolled example; the threshold
is the one that decides most of these pairs right (:func:`choose_threshold`).

``tools/gallery.py enroll`` builds the file (from a folder of images named by identity, or a COCO
json with ``instance_id``), ``tools/demo.py --gallery`` labels detections with it. The file is
a plain dict of tensors, lists and numbers (loads with ``weights_only=True``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .metric.evaluation import _best_threshold

__all__ = ['Gallery', 'GalleryError', 'choose_threshold', 'UNKNOWN']

UNKNOWN = 'unknown'
VERSION = 1


class GalleryError(ValueError):
    """A gallery that cannot be built, read or used (the message says why)."""


@dataclass
class Gallery:
    names: list[str]  # (K,) identity names
    embeddings: Tensor  # (M, D) float32 unit vectors of the enrolled examples
    owner: Tensor  # (M,) int64 identity index of each example
    threshold: float  # nearest-example distance above it: unknown
    info: dict = field(default_factory=dict)  # how it was built, how the threshold was chosen

    def __post_init__(self):
        self.embeddings = torch.as_tensor(self.embeddings, dtype=torch.float32)
        self.owner = torch.as_tensor(self.owner, dtype=torch.int64)
        if len(self.names) == 0 or len(self.embeddings) == 0:
            raise GalleryError('the gallery is empty: no identity was enrolled')
        if self.embeddings.dim() != 2 or len(self.owner) != len(self.embeddings):
            raise GalleryError(f'embeddings {tuple(self.embeddings.shape)} and owner {tuple(self.owner.shape)} '
                               'do not describe M examples of dimension D')
        if int(self.owner.min()) < 0 or int(self.owner.max()) >= len(self.names):
            raise GalleryError(f'example owners must lie in [0, {len(self.names)})')
        if not math.isfinite(self.threshold):
            raise GalleryError(f'the verification threshold is not a finite number: {self.threshold}')

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def distances(self, emb) -> Tensor:
        """(k, K): each detection's distance to each identity's nearest enrolled example."""
        emb = torch.as_tensor(np.asarray(emb, np.float32) if not isinstance(emb, Tensor) else emb).float()
        if emb.dim() != 2 or emb.shape[1] != self.dim:
            raise GalleryError(f'embeddings of shape {tuple(emb.shape)} do not match the gallery (D = {self.dim}): '
                               'was it enrolled with another model?')
        d = torch.cdist(emb, self.embeddings)  # (k, M)
        per_id = torch.full((len(emb), len(self.names)), math.inf)
        return per_id.scatter_reduce(1, self.owner.expand(len(emb), -1), d, 'amin')

    def identify(self, emb) -> tuple[list[str], np.ndarray]:
        """(names (k,), distances (k,)): the nearest identity, or ``'unknown'`` beyond the threshold."""
        if len(emb) == 0:
            return [], np.zeros(0, np.float32)
        dist, who = self.distances(emb).min(1)
        names = [self.names[j] if d <= self.threshold else UNKNOWN for d, j in zip(dist.tolist(), who.tolist())]
        return names, dist.numpy()

    def save(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({'gfl_det_gallery': VERSION, 'names': list(self.names), 'embeddings': self.embeddings,
                    'owner': self.owner, 'threshold': float(self.threshold), 'info': dict(self.info)}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> 'Gallery':
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise GalleryError(f'gallery not found: {path} (build one with tools/gallery.py enroll)')
        try:
            d = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise GalleryError(f'{path} is not a readable gallery file ({type(e).__name__}: {e})') from e
        if not isinstance(d, dict) or 'gfl_det_gallery' not in d:
            raise GalleryError(f'{path} is not a gallery written by tools/gallery.py enroll')
        try:
            return cls(d['names'], d['embeddings'], d['owner'], d['threshold'], d.get('info', {}))
        except GalleryError as e:
            raise GalleryError(f'{path}: {e}') from None

    def describe(self) -> str:
        counts = torch.bincount(self.owner, minlength=len(self.names))
        return (f'{len(self.names)} identities, {len(self.owner)} enrolled examples '
                f'({int(counts.min())}-{int(counts.max())} per identity), D = {self.dim}, '
                f'threshold {self.threshold:.4f} ({self.info.get("threshold_from", "?")})')


def choose_threshold(gallery_emb: Tensor, owner: Tensor, held_emb: Tensor, held_owner: Tensor,
                     num_identities: int) -> dict:
    """The verification threshold from held-out examples of enrolled identities (module doc):
    ``{'threshold', 'accuracy', 'same_pairs', 'different_pairs'}``. Each held-out example gives a
    same pair (to its identity) and, with more than one identity, a different pair (to its nearest
    other identity)."""
    if len(held_emb) == 0:
        raise GalleryError('no held-out example to choose the verification threshold on: enroll fewer '
                           'examples per identity than there are, or give the threshold yourself')
    g = Gallery([str(i) for i in range(num_identities)], gallery_emb, owner, 0.0)
    d = g.distances(held_emb)  # (H, K)
    rows = torch.arange(len(d))
    same = d[rows, held_owner]
    other = d.clone()
    other[rows, held_owner] = math.inf
    impostor = other.min(1).values
    impostor = impostor[torch.isfinite(impostor)]
    dist = torch.cat([same, impostor]).double()
    is_same = torch.cat([torch.ones(len(same), dtype=torch.bool), torch.zeros(len(impostor), dtype=torch.bool)])
    t = _best_threshold(dist, is_same)
    accuracy = ((dist <= t) == is_same).double().mean().item()
    return {'threshold': float(t), 'accuracy': accuracy, 'same_pairs': len(same), 'different_pairs': len(impostor)}


def split_examples(groups: Sequence[Sequence], per_identity: int, seed: int = 0,
                   max_held: int | None = None) -> tuple[list, list]:
    """Per identity k (``groups[k]``: its examples) the first ``per_identity`` after a seeded
    shuffle are enrolled, up to ``max_held`` of the others held out: (enrolled, held), lists of
    (k, example)."""
    rng = np.random.default_rng(seed)
    enrolled, held = [], []
    for k, examples in enumerate(groups):
        order = rng.permutation(len(examples))
        enrolled += [(k, examples[j]) for j in order[:per_identity]]
        held += [(k, examples[j]) for j in order[per_identity:][:max_held]]
    return enrolled, held
