"""The three GFL losses, written as the paper writes them: elementwise, no reduction, no weights.

Li et al., "Generalized Focal Loss" (NeurIPS 2020). Normalisation and weighting live in one
place, :class:`gfl_det.criterion.GFLCriterion`.

- Quality Focal Loss (eq. 5), for a soft target y in [0, 1] (the IoU of the prediction with
  its gt at the positive's class, 0 for every other class and prior), s = sigmoid(x):

      QFL(x, y) = -|y - s|^beta ((1 - y) log(1 - s) + y log s) = BCE(x, y) |y - s|^beta

  The modulating factor |y - s|^beta is not detached (as in MMDetection).
- Distribution Focal Loss (eq. 6): for a continuous target t between the bins i = floor(t)
  and i + 1, with S the softmax of the distribution logits,

      DFL(S, t) = -((i + 1 - t) log S_i + (t - i) log S_{i+1})

- GIoU loss: 1 - GIoU(pred, target).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .boxes import aligned_giou

__all__ = ['quality_focal_loss', 'distribution_focal_loss', 'giou_loss']


def quality_focal_loss(logits: Tensor, target: Tensor, beta: float = 2.0) -> Tensor:
    """QFL(x, y) elementwise; ``target`` y in [0, 1] has the logits' shape."""
    s = logits.sigmoid()
    return F.binary_cross_entropy_with_logits(logits, target, reduction='none') * (target - s).abs().pow(beta)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL of distribution logits (..., R + 1) for continuous targets (...) in [0, R).

    Targets must be below R (MMDetection clamps them to R - 0.1) so that bin i + 1 exists.
    """
    log_s = F.log_softmax(logits, dim=-1)
    i = target.long()  # the bin left of the target
    bins = torch.stack([i, i + 1], -1)  # (..., 2): the two bins around the target
    weights = torch.stack([(i + 1).to(target.dtype) - target, target - i.to(target.dtype)], -1)  # distance to the other
    return -(log_s.gather(-1, bins) * weights).sum(-1)


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - GIoU, elementwise over boxes (..., 4) xyxy -> (...)."""
    return 1 - aligned_giou(pred, target, eps=eps)
