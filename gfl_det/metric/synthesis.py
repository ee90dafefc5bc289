"""Symmetrical Synthesis (Gu & Ko, "Symmetrical Synthesis for Deep Metric Learning", AAAI 2020).

For a pair (x_k, x_l) of one identity, each point is reflected about the other's axis
(u = x / |x|):

    x'_k = 2 (x_k . u_l) u_l - x_k        x'_l = 2 (x_l . u_k) u_k - x_l

A reflection keeps norms (|x'_k| = |x_k|) and the pair's distance and cosine
(|x'_k - x_l| = |x_k - x_l| = |x_k - x'_l|): synthetic points of a normalised embedding stay on
the hypersphere. An anchor of another identity that takes its negative from the pair uses the
nearest of the four candidates {x_k, x_l, x'_k, x'_l}: a harder negative made by algebra,
without hyperparameters or an extra network. Positives are never touched.

``symmetrical_synthesis`` is the pure function (embeddings and labels in, candidates out) that
any loss can use; ``nearest_candidates`` is what the triplet miners use: the distance from each
anchor to each pair's nearest candidate.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .distance import pairwise_distance


class SymmetricalPairs(NamedTuple):
    """U same-identity pairs and their synthetic points.

    k, l (U,): indices of the pair's members (k < l). An identity with a single member in the
    batch gives the pair (k, k), whose reflections are x_k itself: its sample still serves as a
    negative, unchanged. reflected_k, reflected_l (U, D): x'_k and x'_l."""
    k: Tensor
    l: Tensor
    reflected_k: Tensor
    reflected_l: Tensor

    def candidates(self, emb: Tensor) -> Tensor:
        """(4, U, D): each pair's four points x_k, x_l, x'_k, x'_l."""
        return torch.stack([emb[self.k], emb[self.l], self.reflected_k, self.reflected_l])


def reflect(x: Tensor, axis: Tensor) -> Tensor:
    """Row-wise reflection of x about the line through 0 and axis: 2 (x . u) u - x, u = axis/|axis|."""
    u = F.normalize(axis, dim=1)  # (U, D)
    return 2.0 * (x * u).sum(1, keepdim=True) * u - x


def symmetrical_synthesis(emb: Tensor, labels: Tensor) -> SymmetricalPairs:
    """Every pair of one identity in the batch and its two synthetic points (see the module doc)."""
    same = labels[:, None] == labels[None, :]  # (N, N)
    k, l = torch.triu(same, diagonal=1).nonzero(as_tuple=True)  # (U,) every pair k < l
    alone = (same.sum(1) == 1).nonzero().squeeze(1)  # identities with one member
    k, l = torch.cat([k, alone]), torch.cat([l, alone])
    x_k, x_l = emb[k], emb[l]  # (U, D)
    return SymmetricalPairs(k, l, reflect(x_k, x_l), reflect(x_l, x_k))


def nearest_candidates(anchors: Tensor, d_rows: Tensor, pairs: SymmetricalPairs,
                       squared: bool = False) -> tuple[Tensor, Tensor]:
    """Distance from each anchor to each pair's nearest candidate.

    anchors (B, D); d_rows (B, N) their distances to the batch's samples (those to x_k and x_l
    are read from it; only the synthetic points need new distances).
    Returns (distances (B, U), indices (B, U) of the nearest candidates in
    ``pairs.candidates(emb).flatten(0, 1)``, the 4 U points x_k, x_l, x'_k, x'_l)."""
    synthetic = pairwise_distance(anchors, torch.cat([pairs.reflected_k, pairs.reflected_l]), squared)
    d = torch.stack([d_rows[:, pairs.k], d_rows[:, pairs.l], *synthetic.chunk(2, dim=1)])  # (4, B, U)
    d, which = d.min(0)  # (B, U)
    return d, which * len(pairs.k) + torch.arange(len(pairs.k), device=d.device)
