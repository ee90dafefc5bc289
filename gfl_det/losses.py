"""The three GFL losses as pure, elementwise functions (no reduction, no weighting).

Normalisation and weighting live in one place, ``gfl_det.models.gfl.GFL.loss``.

- Quality Focal Loss (Li et al. 2020, eq. 5):
  QFL(x, y) = BCE(sigmoid(x), y) * |y - sigmoid(x)|^beta, y in [0, 1] the IoU quality target
  of the anchor's class (0 for every other class). The modulating factor is not detached
  (as in MMDetection).
- Distribution Focal Loss (eq. 6): for a continuous target t between bins i = floor(t) and
  i + 1, DFL = CE(logits, i) * (i + 1 - t) + CE(logits, i + 1) * (t - i).
- GIoU loss: 1 - GIoU(pred, target).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .boxes import aligned_giou


def qfl_negative(logits: Tensor, beta: float = 2.0) -> Tensor:
    """QFL for target 0: BCE(x, 0) * sigmoid(x)^beta = softplus(x) * sigmoid(x)^beta (elementwise)."""
    s = logits.sigmoid()
    mod = s * s if beta == 2.0 else s.pow(beta)
    return F.softplus(logits) * mod


class _QFLSum(torch.autograd.Function):
    """Total QFL (beta 2) of dense logits with sparse positives, and its gradient, in one pass.

    sum_{b,a} valid[b,a] * sum_c QFL(x, 0)  +  sum_n w_n * (QFL(x_n, q_n) - QFL(x_n, 0)),
    where x_n = logits.view(-1)[pos_index[n]] are the positives' logits at their class.

    The dense negative term over every prior and class is the largest elementwise cost of the
    loss. One pass over the logits in chunks that stay in cache computes it and, when a
    gradient is wanted, its gradient d/dx QFL(x, 0) = s^2 (s + 2 (1 - s) softplus(x))
    (s = sigmoid(x)) times the valid weight; the positives' corrections (a few thousand
    elements) are added into that buffer with ``index_add_``; backward is then one multiply by
    the incoming scalar. Autograd over the separate ops keeps several (B, A, C) intermediates
    and does a dense zero-fill + scatter for the positives' gather: this is ~4x faster on CPU.

    In the dense pass sigmoid and softplus come from one exp of -|x|: with e = exp(-|x|) and
    d = 1 + e, softplus(x) = max(x, 0) + log(d), sigmoid(x) = exp(min(x, 0)) / d. ``log(d)``
    instead of ``log1p(e)`` (not vectorised on CPU, ~7x slower) is off by at most 1.2e-7
    absolute in softplus, always multiplied by s^2 here (at x < -16, where log(d) rounds to 0,
    s^2 < 1e-13), so no loss or gradient changes measurably. The positives use the exact ops.
    """

    CHUNK = 1 << 17  # elements per chunk (512 KiB of float32: 1 << 16..18 measured, this fastest)

    @staticmethod
    def forward(ctx, logits: Tensor, valid: Tensor, pos_index: Tensor, pos_target: Tensor,
                pos_weight: Tensor) -> Tensor:
        x = logits.reshape(-1, logits.shape[-1])
        w = valid.reshape(-1).to(x.dtype)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(x) if want_grad else None
        rows = max(1, _QFLSum.CHUNK // max(1, x.shape[1]))
        total = x.new_zeros(())
        for i in range(0, x.shape[0], rows):
            xc, wc = x[i:i + rows], w[i:i + rows]
            d = torch.exp(xc.abs().neg_()).add_(1)
            sp = torch.log(d).add_(xc.clamp_min(0))
            s = torch.exp(xc.clamp_max(0)).div_(d)
            s2 = s * s
            total = total + torch.dot((sp * s2).sum(1), wc)
            if want_grad:
                torch.mul(s.neg().add_(1).mul_(sp).mul_(2).add_(s).mul_(s2), wc[:, None], out=grad[i:i + rows])
        # positives: QFL(x, q) - QFL(x, 0) = (sp - q x) (q - s)^2 - sp s^2, exact ops
        xp = x.view(-1)[pos_index]
        q, pw = pos_target.to(x.dtype), pos_weight.to(x.dtype)
        sp, s = F.softplus(xp), torch.sigmoid(xp)
        bce = sp - q * xp
        total = total + torch.dot(bce * (q - s) ** 2 - sp * s * s, pw)
        if want_grad:
            gp = (s - q) ** 3 + 2 * bce * (s - q) * s * (1 - s) - s * s * (s + 2 * (1 - s) * sp)
            grad.view(-1).index_add_(0, pos_index, gp * pw)
        ctx.grad, ctx.logits_shape = grad, logits.shape
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        return (ctx.grad * grad_out).view(ctx.logits_shape), None, None, None, None


def qfl_sum(logits: Tensor, valid: Tensor, pos_index: Tensor, pos_target: Tensor, pos_weight: Tensor,
            beta: float = 2.0) -> Tensor:
    """Total Quality Focal Loss of dense logits (..., C) whose targets are 0 except at a few positives.

    valid (...) weights every prior's dense negative term; ``pos_index`` indexes the positives'
    elements in ``logits.view(-1)`` (prior x class), with IoU targets ``pos_target`` and weights
    ``pos_weight`` (0 for slots that are not positives). Equals
    ``(quality_focal_loss(logits, T).sum(-1) * valid).sum()`` for the dense target T when every
    positive is valid. beta 2 runs the fused pass; any other beta the same sum through autograd.
    """
    if beta == 2.0:
        return _QFLSum.apply(logits, valid, pos_index, pos_target, pos_weight)
    xp = logits.reshape(-1)[pos_index]
    pos = (quality_focal_loss(xp, pos_target.to(xp.dtype), beta) - qfl_negative(xp, beta)) * pos_weight
    return (qfl_negative(logits, beta).sum(-1) * valid.to(logits.dtype)).sum() + pos.sum()


def quality_focal_loss(logits: Tensor, target: Tensor, beta: float = 2.0) -> Tensor:
    """Elementwise QFL for a soft target ``target`` in [0, 1] (same shape as logits)."""
    s = logits.sigmoid()
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * (target - s).abs().pow(beta)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL of distribution logits (..., R+1) for continuous targets (...) in [0, R).

    Targets must already be clamped below R (MMDetection clamps to R - 0.1) so bin i + 1 exists.
    """
    left = target.long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    logp = F.log_softmax(logits, dim=-1)
    ce_left = -logp.gather(-1, left[..., None]).squeeze(-1)
    ce_right = -logp.gather(-1, right[..., None]).squeeze(-1)
    return ce_left * w_left + ce_right * w_right


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - GIoU, elementwise over boxes (..., 4) -> (...)."""
    return 1 - aligned_giou(pred, target, eps=eps)
