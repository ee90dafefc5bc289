"""Quality Focal Loss summed over a batch in one fused pass (beta = 2): the same number and the
same gradient as the readable ``(quality_focal_loss(cls, score).sum(-1) * valid).sum()`` of
:meth:`gfl_det.criterion.GFLCriterion.loss_sums`, without its (B, A, C) intermediates.

Legend: B images, C classes, A priors over all levels, H_l x W_l the map of level l.

QFL(x, y) = BCE(x, y) |y - s|^2 with s = sigmoid(x) (``gfl_det.losses.quality_focal_loss``).
Every (prior, class) has target 0 except a positive prior's own class (target = IoU q), so

    sum = sum_{b,a} valid[b,a] sum_c QFL(x[b,c,a], 0)                     (dense negatives)
        + sum_{positive (b,a)} QFL(x[b,l,a], q[b,a]) - QFL(x[b,l,a], 0)    (l = its class)

The dense term is the cost: it runs on the head's (B, C, H, W) maps as they are (no (B, A, C)
transpose copy, nor of its gradient), in column chunks that stay in cache, computing the
gradient dQFL(x, 0)/dx = s^2 (s + 2 (1 - s) softplus(x)) in the same pass; the positives'
corrections are one gather / scatter per level. Backward multiplies the stored gradient by
the incoming scalar.

softplus(x) in the dense pass is max(x, 0) - log(sigmoid(|x|)) (the vectorised sigmoid and
log instead of ``log1p``, which PyTorch does not vectorise on the CPU): at most 1.2e-7 off in
absolute terms over [-40, 40], always multiplied by s^2. The positives use the exact ops.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['fused_qfl_sum']

CHUNK = 1 << 17  # elements per chunk (512 KiB of float32; 1 << 16..18 measured alike)


def fused_qfl_sum(levels: Sequence[Tensor], valid: Tensor, labels: Tensor, quality: Tensor) -> Tensor:
    """Total QFL (beta 2) of per-level class logits [(B, C, H_l, W_l)].

    valid (B, A) weights each prior; labels (B, A) is the class of a positive prior and C
    (background) elsewhere; quality (B, A) the positives' IoU target.
    """
    return _FusedQFL.apply(valid, labels, quality, *levels)


def _qfl_grad_at_zero(s: Tensor, sp: Tensor) -> Tensor:
    return s * s * (s + 2 * (1 - s) * sp)


class _FusedQFL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, valid: Tensor, labels: Tensor, quality: Tensor, *levels: Tensor) -> Tensor:
        ctx.shapes = [(x.shape, x.dtype) for x in levels]
        # half-precision logits (autocast) are summed in float32, float64 stays float64
        levels = [(x if x.dtype == torch.float64 else x.float()).contiguous() for x in levels]
        B, C = levels[0].shape[:2]
        want_grad = any(ctx.needs_input_grad[3:])
        cols = max(1, CHUNK // max(1, B * C))  # columns per chunk, every image and class
        total = levels[0].new_zeros(())
        grads, start = [], 0
        for x in levels:
            x = x.view(B, C, -1)  # (B, C, HW_l)
            hw = x.shape[-1]
            w = valid[:, start:start + hw].to(x.dtype)  # (B, HW_l)
            grad = torch.empty_like(x) if want_grad else None
            for j in range(0, hw, cols):  # dense negatives, target 0
                xc, wc = x[:, :, j:j + cols], w[:, j:j + cols]
                sp = torch.log(torch.sigmoid(xc.abs())).neg_().add_(xc.clamp_min(0))  # softplus
                s = torch.sigmoid(xc)
                s2 = s * s
                total = total + ((sp * s2).sum(1) * wc).sum()
                if want_grad:
                    torch.mul(s.neg().add_(1).mul_(sp).mul_(2).add_(s).mul_(s2), wc[:, None],
                              out=grad[:, :, j:j + cols])
            # positives: QFL(x, q) - QFL(x, 0) at their class, exact ops
            lab = labels[:, start:start + hw]  # (B, HW_l)
            is_pos = (lab < C).to(x.dtype) * w
            idx = lab.clamp(max=C - 1)[:, None]  # (B, 1, HW_l)
            xp = x.gather(1, idx).squeeze(1)  # (B, HW_l)
            q = quality[:, start:start + hw].to(x.dtype)
            sp, s = F.softplus(xp), torch.sigmoid(xp)
            bce = sp - q * xp
            total = total + ((bce * (q - s) ** 2 - sp * s * s) * is_pos).sum()
            if want_grad:
                gp = ((s - q) ** 3 + 2 * bce * (s - q) * s * (1 - s) - _qfl_grad_at_zero(s, sp)) * is_pos
                grad.scatter_add_(1, idx, gp[:, None])
            grads.append(grad)
            start += hw
        ctx.grads = grads if want_grad else None
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        return (None, None, None) + tuple((g * grad_out).view(shape).to(dtype)
                                          for g, (shape, dtype) in zip(ctx.grads, ctx.shapes))
