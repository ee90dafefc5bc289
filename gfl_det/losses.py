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

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .boxes import aligned_giou


def qfl_negative(logits: Tensor, beta: float = 2.0) -> Tensor:
    """QFL for target 0: BCE(x, 0) * sigmoid(x)^beta = softplus(x) * sigmoid(x)^beta (elementwise)."""
    s = logits.sigmoid()
    mod = s * s if beta == 2.0 else s.pow(beta)
    return F.softplus(logits) * mod


def _level_take(levels: Sequence[Tensor], starts: Sequence[int], level: Tensor, img: Tensor, prior: Tensor,
                cls: Tensor) -> Tensor:
    """``x[img, cls, prior - start]`` of the level each prior is on, without concatenating the
    levels: one gather per level, the others masked out (no host sync; a few thousand indices)."""
    out = None
    for lv, (x, start) in enumerate(zip(levels, starts)):
        x = x.flatten(2)  # (B, C, HW_l)
        v = x[img, cls, (prior - start).clamp(0, x.shape[-1] - 1)]
        out = v if out is None else torch.where(level == lv, v, out)
    return out


def _level_starts(levels: Sequence[Tensor]) -> list[int]:
    starts, n = [], 0
    for x in levels:
        starts.append(n)
        n += x.shape[-2] * x.shape[-1]
    return starts


def _level_of(prior: Tensor, starts: Sequence[int]) -> Tensor:
    return torch.bucketize(prior, torch.tensor(starts[1:], dtype=prior.dtype, device=prior.device), right=True)


class _QFLSum(torch.autograd.Function):
    """Total QFL (beta 2) of per-level dense logits with sparse positives, and its gradient, in one pass.

    sum_{b,a} valid[b,a] * sum_c QFL(x[b,c,a], 0)  +  sum_n w_n * (QFL(x_n, q_n) - QFL(x_n, 0)),
    where a runs over the priors of every level (in anchor order) and x_n = x[img_n, cls_n, prior_n]
    are the positives' logits at their class.

    The dense negative term over every prior and class is the largest elementwise cost of the
    loss. It is computed on the head's (B, C, H, W) maps as they are -- no (B, A, C) transpose
    copy of the logits forward, nor of their gradient backward -- in column chunks of every
    level that stay in cache, together with its gradient d/dx QFL(x, 0) = s^2 (s + 2 (1 - s)
    softplus(x)) (s = sigmoid(x)) times the valid weight; the positives' corrections (a few
    thousand elements) are added into those buffers with ``index_add_``; backward is then one
    multiply by the incoming scalar per level. Autograd over the separate ops keeps several
    intermediates of the logits' size and does a dense zero-fill + scatter for the positives'
    gather.

    In the dense pass softplus(x) = max(x, 0) - log(sigmoid(|x|)) = max(x, 0) + log1p(exp(-|x|)):
    the log of the (vectorised, fast) sigmoid instead of ``log1p`` (not vectorised on CPU, ~7x
    slower) is off by at most 1.2e-7 absolute in softplus (measured over [-40, 40]), always
    multiplied by s^2 here (at x < -16, where the term rounds to 0, s^2 < 1e-13), so no loss or
    gradient changes measurably. The positives use the exact ops.
    """

    CHUNK = 1 << 17  # elements per chunk (512 KiB of float32: 1 << 16..18 measured, this fastest)

    @staticmethod
    def forward(ctx, valid: Tensor, img: Tensor, prior: Tensor, cls: Tensor, pos_target: Tensor,
                pos_weight: Tensor, *levels: Tensor) -> tuple[Tensor, Tensor]:
        levels = [x.contiguous() for x in levels]
        B, C = levels[0].shape[:2]
        dtype = levels[0].dtype
        want_grad = any(ctx.needs_input_grad[6:])
        starts = _level_starts(levels)
        cols = max(1, _QFLSum.CHUNK // max(1, B * C))  # column blocks of every image and class
        total = levels[0].new_zeros(())
        prior_max = levels[0].new_empty(B, valid.shape[1])
        grads = []
        for x, start in zip(levels, starts):
            x = x.view(B, C, -1)
            hw = x.shape[-1]
            w = valid[:, start:start + hw].to(dtype)
            grad = torch.empty_like(x) if want_grad else None
            for j in range(0, hw, cols):
                xc, wc = x[:, :, j:j + cols], w[:, j:j + cols]
                torch.amax(xc, 1, out=prior_max[:, start + j:start + j + xc.shape[-1]])
                sp = torch.log(torch.sigmoid(xc.abs())).neg_().add_(xc.clamp_min(0))
                s = torch.sigmoid(xc)
                s2 = s * s
                total = total + ((sp * s2).sum(1) * wc).sum()
                if want_grad:
                    torch.mul(s.neg().add_(1).mul_(sp).mul_(2).add_(s).mul_(s2), wc[:, None],
                              out=grad[:, :, j:j + cols])
            grads.append(grad)
        # positives: QFL(x, q) - QFL(x, 0) = (sp - q x) (q - s)^2 - sp s^2, exact ops
        level = _level_of(prior, starts)
        xp = _level_take(levels, starts, level, img, prior, cls)
        q, pw = pos_target.to(dtype), pos_weight.to(dtype)
        sp, s = F.softplus(xp), torch.sigmoid(xp)
        bce = sp - q * xp
        total = total + torch.dot(bce * (q - s) ** 2 - sp * s * s, pw)
        if want_grad:
            gp = ((s - q) ** 3 + 2 * bce * (s - q) * s * (1 - s) - s * s * (s + 2 * (1 - s) * sp)) * pw
            for lv, (grad, start) in enumerate(zip(grads, starts)):
                hw = grad.shape[-1]
                flat = (img * C + cls) * hw + (prior - start).clamp(0, hw - 1)
                grad.view(-1).index_add_(0, flat, torch.where(level == lv, gp, 0.0))
        ctx.grads = [g.view(x.shape) for g, x in zip(grads, levels)] if want_grad else None
        ctx.mark_non_differentiable(prior_max)
        return total, prior_max

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_prior_max):
        return (None,) * 6 + tuple(g * grad_out for g in ctx.grads)


def qfl_sum(levels: Sequence[Tensor], valid: Tensor, img: Tensor, prior: Tensor, cls: Tensor,
            pos_target: Tensor, pos_weight: Tensor, beta: float = 2.0) -> tuple[Tensor, Tensor]:
    """Total Quality Focal Loss of per-level dense logits [(B, C, H_l, W_l)] whose targets are 0
    except at a few positives, and (detached) every prior's largest class logit (B, A), which the
    box losses' weights need: the fused pass reads each logit once for both.

    valid (B, A) weights every prior's dense negative term (A = all levels' priors, in anchor
    order); positive n sits at image ``img[n]``, prior ``prior[n]`` (over all levels), class
    ``cls[n]``, with IoU target ``pos_target[n]`` and weight ``pos_weight[n]`` (0 for slots that are
    not positives). Equals ``(quality_focal_loss(flatten_cls(levels), T).sum(-1) * valid).sum()``
    for the dense target T when every positive is valid. beta 2 runs the fused pass; any other
    beta the same sum through autograd.
    """
    if beta == 2.0:
        return _QFLSum.apply(valid, img, prior, cls, pos_target, pos_weight, *levels)
    prior_max = torch.cat([x.detach().amax(1).flatten(1) for x in levels], 1)
    starts = _level_starts(levels)
    xp = _level_take(levels, starts, _level_of(prior, starts), img, prior, cls)
    pos = (quality_focal_loss(xp, pos_target.to(xp.dtype), beta) - qfl_negative(xp, beta)) * pos_weight
    dense = sum((qfl_negative(x, beta).sum(1).flatten(1) * valid[:, st:st + x.shape[-2] * x.shape[-1]].to(x.dtype)).sum()
                for x, st in zip(levels, starts))
    return dense + pos.sum(), prior_max


def quality_focal_loss(logits: Tensor, target: Tensor, beta: float = 2.0) -> Tensor:
    """Elementwise QFL for a soft target ``target`` in [0, 1] (same shape as logits)."""
    s = logits.sigmoid()
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * (target - s).abs().pow(beta)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL of distribution logits (..., R+1) for continuous targets (...) in [0, R).

    Targets must already be clamped below R (MMDetection clamps to R - 0.1) so bin i + 1 exists.
    """
    return dfl_from_log_probs(F.log_softmax(logits, dim=-1), target)


def dfl_from_log_probs(logp: Tensor, target: Tensor) -> Tensor:
    """DFL from the distributions' log-probabilities (..., R+1) (``log_softmax`` of the logits,
    which the loss shares with the integral): the cross-entropy of the two bins around each
    target, weighted by the target's distance to the other bin."""
    left = target.long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    ce_left = -logp.gather(-1, left[..., None]).squeeze(-1)
    ce_right = -logp.gather(-1, right[..., None]).squeeze(-1)
    return ce_left * w_left + ce_right * w_right


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - GIoU, elementwise over boxes (..., 4) -> (...)."""
    return 1 - aligned_giou(pred, target, eps=eps)
