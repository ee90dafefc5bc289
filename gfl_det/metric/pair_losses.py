"""Losses over pairs: contrastive (Hadsell et al. 2006) and multi-class N-pair (Sohn 2016).

Both L2-normalise their embeddings first. Shape legend: N embeddings, M pairs, D dimension.
"""
from __future__ import annotations

from itertools import combinations
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .distance import check_embeddings, normalize, pairwise_distance, same_identity, zero_loss
from .synthesis import reflect


def contrastive_loss(emb: Tensor, labels: Tensor, pos_margin: float = 0.0,
                     neg_margin: float = 1.0) -> Tensor:
    """Every ordered pair (i, j), i != j, of the batch:

        positive (same label): max(d_ij - pos_margin, 0)
        negative:              max(neg_margin - d_ij, 0)

    each kind averaged over its non-zero terms, the two averages added (pytorch-metric-learning's
    ContrastiveLoss with its AvgNonZeroReducer). emb (N, D), labels (N,) int64.

    Both terms are linear in the distances of the active pairs (those with a non-zero term), so
    the loss is computed as sum_ij w_ij d_ij + c with w_ij = 1 / #active positives on active
    positives, -1 / #active negatives on active negatives: one weighted sum over the (N, N)
    matrix, the same value and gradient as the two masked means."""
    check_embeddings(emb, labels)
    d = pairwise_distance(normalize(emb))  # (N, N)
    pos, neg = same_identity(labels)  # (N, N)
    with torch.no_grad():
        active_pos = pos & (d > pos_margin)  # (N, N) pairs with a non-zero term
        active_neg = neg & (d < neg_margin)
        n_pos, n_neg = int(active_pos.sum()), int(active_neg.sum())
        weights = torch.zeros_like(d).masked_fill_(active_pos, 1 / max(n_pos, 1))  # (N, N)
        weights.masked_fill_(active_neg, -1 / max(n_neg, 1))
        constant = neg_margin * (n_neg > 0) - pos_margin * (n_pos > 0)
    return (weights * d).sum() + constant
def npair_loss(anchor: Tensor, positive: Tensor, labels: Tensor, scale: float = 1.0,
               synthesis: Optional[str] = None) -> Tensor:
    """Multi-class N-pair loss: pair i = (anchor_i, positive_i) of identity labels_i; each anchor
    classifies its positive among all positives by softmax over similarities,

        L = mean_i  -sum_j t_ij log softmax_j(scale * s_ij),   s_ij = a_i . p_j

    with t_ij = [labels_i == labels_j] / #{j : labels_j == labels_i} (TensorFlow's npairs_loss;
    one-hot when the labels are distinct, which is pytorch-metric-learning's NPairsLoss).
    On unit vectors s lies in [-1, 1]: ``scale`` (a temperature 1/scale) sharpens the softmax;
    Sohn's L2 penalty on the embeddings is constant after normalisation and left out.

    ``synthesis='symmetrical'`` (Gu & Ko 2020): with x'_a the anchor reflected about its positive's
    axis and x'_p the positive reflected about the anchor's, the similarity of pair i to a pair j of
    another identity is the largest over the six pairings of (a, p, x'_p, x'_a)_i with
    (a, p, x'_p, x'_a)_j that the authors' code takes (itertools.combinations of the four, the
    first from pair i). Entries of one identity keep s_ij: the authors' code also takes the max
    there, which can raise a positive's similarity; we keep positives exactly as without
    synthesis, as the paper describes.

    anchor, positive (M, D) float; labels (M,) int64."""
    check_embeddings(anchor, labels, name="anchor")
    check_embeddings(positive, labels, name="positive")
    if anchor.shape[1] != positive.shape[1]:
        raise ValueError(f"anchor has D = {anchor.shape[1]}, positive {positive.shape[1]}")
    if synthesis not in (None, "symmetrical"):
        raise ValueError(f"unknown synthesis {synthesis!r}: use None or 'symmetrical'")
    if len(anchor) == 0:
        return zero_loss(anchor, positive)
    a, p = normalize(anchor), normalize(positive)  # (M, D)
    sim = a @ p.T  # (M, M)
    same = labels[:, None] == labels[None, :]  # (M, M)
    if synthesis == "symmetrical":
        points = (a, p, reflect(p, a), reflect(a, p))  # authors' order: anchor, pos, sym1, sym2
        synthetic = torch.stack([u @ v.T for u, v in combinations(points, 2)]).amax(0)  # (M, M)
        sim = torch.where(same, sim, synthetic)
    targets = same.to(sim.dtype) / same.sum(1, keepdim=True)  # (M, M) rows sum to 1
    return -(targets * F.log_softmax(scale * sim, dim=1)).sum(1).mean()
