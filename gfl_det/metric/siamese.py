"""Siamese verification head (Koch et al. 2015 one-shot networks; DeepFace's weighted chi/L1):

    p(same | x1, x2) = sigmoid( sum_k w_k |f(x1)_k - f(x2)_k| + b )

trained with binary cross-entropy on pairs mined from the batch: every positive pair and the
hardest negative pairs (smallest embedding distance), ``neg_per_pos`` of them per positive.
Embeddings are L2-normalised before the head sees them. Shape legend: N embeddings, D
dimension, P mined pairs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distance import check_embeddings, normalize, pairwise_distance, same_identity, zero_loss


class SiameseBinaryHead(nn.Module):
    """Logit of p(same) from two (P, D) embeddings: w . |e1 - e2| + b."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, e1: Tensor, e2: Tensor) -> Tensor:
        return self.fc((e1 - e2).abs()).squeeze(1)  # (P,)


def siamese_pairs(emb: Tensor, labels: Tensor, neg_per_pos: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Indices (i, j) (P,) of every positive pair i < j and of the ceil(neg_per_pos * positives)
    nearest negative pairs, and their targets (P,) (1 same, 0 different)."""
    with torch.no_grad():
        d = pairwise_distance(normalize(emb))  # (N, N)
        pos, neg = same_identity(labels)  # (N, N)
        upper = torch.ones_like(pos).triu(1)  # each unordered pair once
        pi, pj = (pos & upper).nonzero(as_tuple=True)
        n_neg = min(math.ceil(neg_per_pos * len(pi)), int((neg & upper).sum()))
        nearest = d.masked_fill(~(neg & upper), math.inf).flatten().topk(n_neg, largest=False).indices
        ni, nj = nearest // len(emb), nearest % len(emb)
    targets = torch.cat([torch.ones(len(pi)), torch.zeros(n_neg)]).to(emb)
    return torch.cat([pi, ni]), torch.cat([pj, nj]), targets


def siamese_binary_loss(emb: Tensor, labels: Tensor, head: SiameseBinaryHead,
                        neg_per_pos: float = 1.0) -> Tensor:
    """Mean binary cross-entropy of ``head`` over the pairs ``siamese_pairs`` mines.
    emb (N, D), labels (N,) int64. No positive pair -> no pair at all (negatives are mined per
    positive): zero loss with a gradient. Positives without negatives still train (as the
    contrastive loss does)."""
    check_embeddings(emb, labels)
    if neg_per_pos < 0:
        raise ValueError(f"neg_per_pos must be >= 0, got {neg_per_pos}")
    i, j, targets = siamese_pairs(emb, labels, neg_per_pos)
    if len(i) == 0:
        return zero_loss(emb, *head.parameters())
    x = normalize(emb)  # (N, D)
    return F.binary_cross_entropy_with_logits(head(x[i], x[j]), targets)
