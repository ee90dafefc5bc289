"""The ResNet stem's 3x3 / stride 2 max pool as two separable passes of elementwise maxima.

PyTorch's NCHW max_pool2d CPU kernel is a scalar loop: 71 ms per 800x1216 R50 image here, 12 ms
as two separable passes (rows, then columns) of ``torch.maximum`` -- bit for bit the same
result, NaN included. Forward only (its gradient would split ties differently), so
:class:`SeparableStemMaxPool` uses it where no gradient flows into the stem -- the default frozen
stem, and inference -- on NCHW CPU float maps outside ``torch.compile`` (inductor writes its
own pooling kernel; channels-last and GPU kernels are fast already), and is the plain
``nn.MaxPool2d`` everywhere else. ``tests/test_fast.py`` checks the equality and that it is used.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ['SeparableStemMaxPool', 'stem_max_pool', 'use_separable_stem_pool']


def _max3s2(x: Tensor, dim: int) -> Tensor:
    """Max over windows of 3 with stride 2 and padding 1 along ``dim``: output i is the max of
    inputs 2i-1, 2i, 2i+1 (those that exist), as ``max_pool`` with ``-inf`` padding."""
    n = x.shape[dim]
    o = (n - 1) // 2 + 1
    step = (slice(None),) * dim + (slice(None, None, 2),)
    centre = x.narrow(dim, 0, 2 * o - 1)[step]  # inputs 2i, i < o
    right = x.narrow(dim, 1, n - 1)[step]  # inputs 2i + 1 (o or o - 1 of them)
    k = right.shape[dim]
    out = torch.maximum(centre.narrow(dim, 0, k), right)
    if k < o:  # n odd: the last window has no right neighbour
        out = torch.cat([out, centre.narrow(dim, k, 1)], dim)
    if o > 1:  # inputs 2i - 1 are the right neighbours of the window before
        tail = out.narrow(dim, 1, o - 1)
        torch.maximum(tail, right.narrow(dim, 0, o - 1), out=tail)
    return out


def stem_max_pool(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 3, 2, 1)`` of an NCHW map, bit for bit, as two separable passes."""
    return _max3s2(_max3s2(x, 2), 3)


class SeparableStemMaxPool(nn.MaxPool2d):
    """``nn.MaxPool2d(3, 2, 1)`` that runs :func:`stem_max_pool` where it applies."""

    def __init__(self) -> None:
        super().__init__(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        if (torch.compiler.is_compiling() or x.device.type != 'cpu' or x.dim() != 4
                or not x.is_floating_point() or not x.is_contiguous()
                or (torch.is_grad_enabled() and x.requires_grad)):
            return super().forward(x)
        return stem_max_pool(x)


def use_separable_stem_pool(backbone: nn.Module) -> bool:
    """Swap the backbone's ``maxpool`` (a plain 3/2/1 ``nn.MaxPool2d``) for
    :class:`SeparableStemMaxPool`, in place; False (nothing done) for any other pool."""
    pool = getattr(backbone, 'maxpool', None)
    if not (type(pool) is nn.MaxPool2d and pool.kernel_size in (3, (3, 3)) and pool.stride in (2, (2, 2))
            and pool.padding in (1, (1, 1)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
            and not pool.return_indices):
        return False
    backbone.maxpool = SeparableStemMaxPool()
    return True
