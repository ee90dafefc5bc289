"""Triplet loss (FaceNet, Schroff et al. 2015) with online mining and optional Symmetrical
Synthesis.

    L(a, p, n) = max(d(a, p) - d(a, n) + margin, 0),  d Euclidean on L2-normalised embeddings

``mining`` chooses the triplets and how they are averaged:

    'all' / 'semihard' / 'hard'  every triplet of that kind, mean over the non-zero losses
                                 (pytorch-metric-learning's TripletMarginMiner(type_of_triplets)
                                 + TripletMarginLoss with its AvgNonZeroReducer)
    'batch-hard'                 per anchor the farthest positive and nearest negative (Hermans
                                 et al. 2017), mean over the non-zero losses (PML's BatchHardMiner
                                 + TripletMarginLoss)
    'facenet'                    every anchor-positive pair with FaceNet's semi-hard negative as
                                 TensorFlow's triplet_semihard_loss picks it (the nearest negative
                                 farther than the positive, else the farthest), mean over pairs

``synthesis='symmetrical'`` replaces each anchor's negatives (the samples of other identities)
by the same-identity pairs of other identities, each at the distance of its nearest candidate
(``synthesis.py``); positives are untouched. Anchors without a positive or a negative add
nothing; a batch without triplets gives a zero loss that still has a gradient.

Memory is O(N^2) (O(N U) under synthesis, U the number of pairs, in chunks of anchors): the N^3
triplets are never formed (``miners.py``). 'batch-hard' and 'facenet' mine on distances without
a gradient and recompute the mined triplets' distances from the embeddings.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .distance import check_embeddings, normalize, pairwise_distance, same_identity, zero_loss
from .miners import batch_hard, facenet_triplets, margin_triplets, sort_negatives
from .synthesis import nearest_candidates, symmetrical_synthesis

MINING = ("all", "semihard", "hard", "batch-hard", "facenet")
SYNTHESIS = (None, "symmetrical")
CHUNK_ELEMENTS = 1 << 24  # anchor rows x candidate points per chunk under synthesis
PICK_CHUNK_ELEMENTS = 1 << 17  # anchor rows x N distances per chunk when mining one triplet per pair


def triplet_loss(emb: Tensor, labels: Tensor, margin: float = 0.2, mining: str = "semihard",
                 synthesis: Optional[str] = None, squared: bool = False) -> Tensor:
    """Mean triplet loss of a batch (see the module doc for ``mining`` and ``synthesis``).

    emb (N, D) float, labels (N,) int64; squared: use |x - y|^2 as the distance (FaceNet's)."""
    check_embeddings(emb, labels)
    if mining not in MINING:
        raise ValueError(f"unknown mining {mining!r}: use one of {MINING}")
    if synthesis not in SYNTHESIS:
        raise ValueError(f"unknown synthesis {synthesis!r}: use None or 'symmetrical'")
    if len(emb) == 0:
        return zero_loss(emb)
    x = normalize(emb)  # (N, D)
    picks_triplets = mining in ("batch-hard", "facenet")
    if synthesis is None and picks_triplets:
        # mined without a gradient a block of anchors at a time (the whole (N, N) matrix is never
        # held), then the mined distances recomputed with one
        a, p, n = _pick_in_chunks(x, labels, mining, squared)
        return _mean_of_triplets(x[a], x[p], x[n], margin, mining, squared)
    pos, neg = same_identity(labels)  # (N, N)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not picks_triplets):
        d = pairwise_distance(x, squared=squared)  # (N, N)

    if synthesis is None:  # the negatives are the samples: d serves as d_ap and d_an
        total, count = margin_triplets(d, pos, d, neg, margin, mining)
        return (total / count.clamp(min=1)).to(emb.dtype)

    pairs = symmetrical_synthesis(x, labels)
    pair_labels = labels[pairs.k]  # (U,)
    rows = max(1, CHUNK_ELEMENTS // (4 * len(pair_labels)))  # (B, 4, U) distances per chunk
    chunks = [slice(s, s + rows) for s in range(0, len(x), rows)]
    if picks_triplets:
        triplets = []
        with torch.no_grad():
            for c in chunks:
                d_an, nearest = nearest_candidates(x[c], d[c], pairs, squared)  # (B, U) each
                neg_c = labels[c, None] != pair_labels[None, :]  # (B, U)
                a, p, n = _pick(d[c], pos[c], d_an, neg_c, mining)
                triplets.append((a + c.start, p, nearest[a, n]))
        a, p, n = (torch.cat(t) for t in zip(*triplets))
        candidates = pairs.candidates(x).flatten(0, 1)  # (4 U, D) x_k, x_l, x'_k, x'_l of every pair
        return _mean_of_triplets(x[a], x[p], candidates[n], margin, mining, squared)

    def block(d_rows: Tensor, x_rows: Tensor, label_rows: Tensor, pos_rows: Tensor):
        d_an, _ = nearest_candidates(x_rows, d_rows, pairs, squared)  # (B, U)
        neg_rows = label_rows[:, None] != pair_labels[None, :]  # (B, U)
        return margin_triplets(d_rows, pos_rows, d_an, neg_rows, margin, mining)

    total, count = 0.0, 0
    for c in chunks:  # more than one chunk: recompute each in the backward pass instead of keeping it
        args = (d[c], x[c], labels[c], pos[c])
        t, n = checkpoint(block, *args, use_reentrant=False) if len(chunks) > 1 else block(*args)
        total, count = total + t, count + n
    return (total / count.clamp(min=1)).to(emb.dtype)


@torch.no_grad()
def _pick_in_chunks(x: Tensor, labels: Tensor, mining: str, squared: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(a, p, n) index triplets mined over blocks of anchor rows (B, N)."""
    rows = max(1, PICK_CHUNK_ELEMENTS // len(x))
    picked = []
    for s in range(0, len(x), rows):
        d = pairwise_distance(x[s:s + rows], x, squared=squared)  # (B, N)
        pos, neg = same_identity(labels, s, s + len(d))  # (B, N)
        a, p, n = _pick(d, pos, d, neg, mining)
        picked.append((a + s, p, n))
    return tuple(torch.cat(t) for t in zip(*picked))


def _pick(d_ap: Tensor, pos: Tensor, d_an: Tensor, neg: Tensor, mining: str):
    if mining == "batch-hard":
        return batch_hard(d_ap, pos, d_an, neg)
    return facenet_triplets(d_ap, pos, sort_negatives(d_an, neg))


def _mean_of_triplets(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float,
                      mining: str, squared: bool) -> Tensor:
    """max(d(a, p) - d(a, n) + margin, 0) of (T, D) triplets: the mean over the non-zero ones
    for 'batch-hard' (PML's AvgNonZeroReducer), over all for 'facenet' (TensorFlow's)."""
    d_ap, d_an = (anchor - positive).norm(dim=1), (anchor - negative).norm(dim=1)  # (T,)
    if squared:
        d_ap, d_an = d_ap * d_ap, d_an * d_an
    losses = (d_ap - d_an + margin).clamp(min=0)  # (T,)
    count = (losses > 0).sum() if mining == "batch-hard" else len(losses)
    return losses.sum() / max(int(count), 1) + zero_loss(anchor)
