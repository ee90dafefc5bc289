"""Online mining as masks over distance matrices: no loop over pairs, no (N, N, N) tensor.

Every miner works on a block of anchor rows (B of them: the whole batch, or a chunk):

    d_ap (B, N)  anchor-to-sample distances,   pos (B, N)  True where the sample is a positive
    d_an (B, U)  anchor-to-negative distances, neg (B, U)  True where the unit is a negative

Without synthesis the negative units are the N samples themselves (d_an is d_ap); under
Symmetrical Synthesis they are same-identity pairs (``synthesis.py``). A triplet (a, p, n)
violates the margin by d(a, p) - d(a, n) + margin.

``batch_hard`` and ``facenet_triplets`` pick one negative per anchor or per anchor-positive pair
and return index triplets (a, p, n): the loss is then computed on those triplets only.
``margin_triplets`` sums over every triplet of a kind of pytorch-metric-learning's
TripletMarginMiner ('all', 'semihard', 'hard') without listing them: each negative pair (a, n)
forms triplets with a range of a's positives sorted by distance, found by binary search; the
loss is a weighted sum of the (N, N) and (N, U) distances. O(N U) memory and O(N U log P) time
(P positives per anchor) instead of N * N * U triplets.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

INF = float("inf")


class SortedNegatives(NamedTuple):
    """Each anchor's negatives in ascending distance: keys (B, U) the distances, +inf after the
    last negative; order (B, U) the negatives' unit indices; count (B,) how many there are."""
    keys: Tensor
    order: Tensor
    count: Tensor


@torch.no_grad()
def sort_negatives(d_an: Tensor, neg: Tensor) -> SortedNegatives:
    keys, order = d_an.masked_fill(~neg, INF).sort(dim=1)  # (B, U)
    return SortedNegatives(keys, order, neg.sum(1))


@torch.no_grad()
def positive_columns(pos: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's positives packed to the left: (cols (B, P), valid (B, P)), P the largest
    number of positives of a row (with P x K batches, K - 1 rather than N), at least 1."""
    count = pos.sum(1)  # (B,)
    width = max(int(count.max()) if len(count) else 0, 1)
    rows, cols = pos.nonzero(as_tuple=True)  # row-major: positives of a row in column order
    slot = torch.arange(len(rows), device=pos.device) - (count.cumsum(0) - count)[rows]
    packed = torch.zeros(len(pos), width, dtype=torch.long, device=pos.device)
    packed[rows, slot] = cols
    return packed, torch.arange(width, device=pos.device)[None, :] < count[:, None]


@torch.no_grad()
def batch_hard(d_ap: Tensor, pos: Tensor, d_an: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hermans et al. 2017: per anchor the farthest positive and the nearest negative.

    Returns index triplets (a, p, n), one per anchor with a positive and a negative (as PML's
    BatchHardMiner; among equal distances the first index)."""
    cols, valid = positive_columns(pos)  # (B, P)
    farthest = d_ap.gather(1, cols).masked_fill(~valid, -INF).argmax(1, keepdim=True)  # (B, 1)
    p = cols.gather(1, farthest).squeeze(1)  # (B,) farthest positive
    n = d_an.masked_fill(~neg, INF).argmin(1)  # (B,) nearest negative
    a = (valid.any(1) & neg.any(1)).nonzero().squeeze(1)  # (T,)
    return a, p[a], n[a]


@torch.no_grad()
def facenet_triplets(d_ap: Tensor, pos: Tensor, negatives: SortedNegatives) -> tuple[Tensor, Tensor, Tensor]:
    """FaceNet's online semi-hard negative, as TensorFlow's triplet_semihard_loss picks it.

    For every anchor-positive pair: the nearest negative farther than the positive,
    min {d(a, n) : d(a, n) > d(a, p)}; where there is none, the farthest negative.
    Returns index triplets (a, p, n), one per pair whose anchor has a negative."""
    keys, order, count = negatives
    cols, valid = positive_columns(pos)  # (B, P)
    first_above = torch.searchsorted(keys, d_ap.gather(1, cols).contiguous(), right=True)  # (B, P)
    farthest = (count - 1).clamp(min=0)[:, None]  # (B, 1)
    chosen = torch.where(first_above < count[:, None], first_above, farthest)  # (B, P)
    a, j = (valid & (count > 0)[:, None]).nonzero(as_tuple=True)  # (T,)
    return a, cols[a, j], order[a, chosen[a, j]]


def margin_triplets(d_ap: Tensor, pos: Tensor, d_an: Tensor, neg: Tensor, margin: float,
                    kind: str) -> tuple[Tensor, Tensor]:
    """Sum and number of the non-zero losses relu(d_ap - d_an + margin) over the triplets of one
    kind of pytorch-metric-learning's TripletMarginMiner (t = d_an - d_ap):

        'all':      t < margin              (the miner keeps t <= margin; t = margin adds 0)
        'semihard': 0 < t < margin
        'hard':     t <= 0, t < margin

    The sum is linear in the distances: sum over triplets of (d_ap + margin - d_an) =
    sum_(a,p) c_ap (d_ap + margin) - sum_(a,n) c_an d_an, where c_ap counts the triplets a
    positive pair is in and c_an those a negative pair is in. With each anchor's few positives
    sorted, the positives a negative at distance t forms triplets with are an index range
    [s, e) of that order ('all': d_ap > t - margin; 'semihard': t - margin < d_ap < t; 'hard':
    d_ap >= t, d_ap > t - margin): c_an = e - s, and c_ap adds up the ranges that cover each
    positive (a difference array: +1 at s, -1 at e, cumulative sum). Gradients flow through d_ap
    and d_an with the counts as weights, exactly the triplets' gradient.
    Returns (sum (float64 scalar), count (int64 scalar))."""
    cols, valid = positive_columns(pos)  # (B, P)
    ap = d_ap.gather(1, cols)  # (B, P) positive distances
    with torch.no_grad():
        keys, order = ap.masked_fill(~valid, INF).sort(dim=1)  # (B, P) positives ascending
        t = d_an.detach().contiguous()  # (B, U)
        above_t_minus_margin = torch.searchsorted(keys, t - margin, right=True)  # (B, U) first d_ap > t - m
        below_t = torch.searchsorted(keys, t)  # (B, U) first d_ap >= t
        n_pos = valid.sum(1, keepdim=True).expand_as(t)  # (B, U)
        if kind == "all":
            s, e = above_t_minus_margin, n_pos
        elif kind == "semihard":
            s, e = above_t_minus_margin, below_t
        elif kind == "hard":
            s, e = torch.maximum(above_t_minus_margin, below_t), n_pos
        else:
            raise ValueError(f"unknown triplet kind {kind!r}: use 'all', 'semihard' or 'hard'")
        c_an = (e - s).clamp(min=0).masked_fill(~neg, 0)  # (B, U) triplets of each negative pair
        covers = torch.zeros(len(keys), keys.shape[1] + 1, dtype=torch.long, device=keys.device)
        covers.scatter_add_(1, s, c_an.sign()).scatter_add_(1, s + c_an, -c_an.sign())
        c_ap = torch.zeros_like(cols).scatter_(1, order, covers.cumsum(1)[:, :-1])  # (B, P)
    total = (c_ap * (ap.double() + margin)).sum() - (c_an * d_an.double()).sum()
    return total, c_an.sum()
