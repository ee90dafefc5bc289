"""ArcFace: additive angular margin loss (Deng et al. 2019), as insightface writes it.

With theta_j the angle between the normalised embedding and class centre W_j, the target
class's logit gets the margin added to its angle:

    logit_y = s * cos(theta_y + m)          where theta_y <= pi - m
    logit_y = s * (cos theta_y - m sin m)   beyond (cos(theta + m) would rise again past pi)
    logit_j = s * cos theta_j               j != y;   loss = cross-entropy(logits, y)

Equal to pytorch-metric-learning's ArcFaceLoss(margin=degrees(m), scale=s) with the same centres
(PML takes the margin in degrees and stores W as (D, C)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distance import check_embeddings, normalize, zero_loss


class ArcFaceLoss(nn.Module):
    """Owns the (C, D) class centres; ``forward(emb (N, D), labels (N,) int64)`` -> mean loss."""

    def __init__(self, num_classes: int, dim: int, scale: float = 64.0, margin: float = 0.5):
        super().__init__()
        if not 0.0 <= margin < math.pi:
            raise ValueError(f"margin is an angle in radians in [0, pi), got {margin}")
        self.scale, self.margin = scale, margin
        self.weight = nn.Parameter(torch.empty(num_classes, dim))  # (C, D) class centres
        nn.init.normal_(self.weight)

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        check_embeddings(emb, labels)
        if emb.shape[1] != self.weight.shape[1]:
            raise ValueError(f"emb has D = {emb.shape[1]}, the centres {self.weight.shape[1]}")
        if len(labels) == 0:
            return zero_loss(emb, self.weight)
        if int(labels.min()) < 0 or int(labels.max()) >= len(self.weight):
            raise ValueError(f"labels must lie in [0, {len(self.weight)}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        m = self.margin
        cos = normalize(emb) @ normalize(self.weight).T  # (N, C) cos theta_j
        cos_y = cos.gather(1, labels[:, None])  # (N, 1)
        sin_y = (1.0 - cos_y * cos_y).clamp(min=1e-12).sqrt()  # (N, 1) sin theta_y >= 0
        with_margin = cos_y * math.cos(m) - sin_y * math.sin(m)  # cos(theta_y + m)
        target = torch.where(cos_y >= -math.cos(m), with_margin, cos_y - m * math.sin(m))
        logits = cos.scatter(1, labels[:, None], target)  # (N, C)
        return F.cross_entropy(self.scale * logits, labels)
