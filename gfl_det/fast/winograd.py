"""Winograd 3x3 convolutions for CPU inference (NNPACK, shipped inside PyTorch).

A GFL R50 forward is ~95% convolutions and more than half of them are 3x3 stride-1 convs on the
large pyramid levels (the head's 2 x 4 tower convs run on every level; P3 alone is ~35% of the
model). oneDNN's direct kernels already run those near the CPU's peak FLOP rate, so the only
way to go faster is fewer multiplications: Winograd F(6x6, 3x3) tiles. PyTorch ships NNPACK's
implementation (``torch._nnpack_spatial_convolution``) but uses it only in builds without
oneDNN; :func:`use_winograd` routes the eligible convolutions of a model there.

Measured on a 2-core AMD EPYC VM (torch 2.14, 2 threads), one 256->256 conv at 100x152: 84 ms
direct, 39 ms Winograd; 50x76: 20 -> 12 ms; at 25x38 and smaller there is no gain (NNPACK
transforms the weights on every call), so small maps keep the direct kernel.

Numerics: Winograd is exact in exact arithmetic; in float32 its rounding error is larger than a
direct convolution's -- ~1.5e-5 of the output's range per conv (measured) against ~1e-7, still
two orders of magnitude below bf16 autocast. ``tests/test_winograd.py`` bounds the change of the
final scores and boxes on a whole model. Use it for inference; training and evaluation
numbers for a paper should come from the direct kernels (the default).

When a call is not eligible -- gradients enabled, not on the CPU, not float32, a batch of more
than one image (NNPACK's batched path is slower than oneDNN here), a channels-last or otherwise
non-contiguous input, a small map -- the module runs the ordinary ``nn.Conv2d`` forward. The
swapped modules keep their class's parameters and state-dict keys.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

MIN_PIXELS = 1024  # output maps smaller than this (e.g. 25x38 = 950) run faster direct


def winograd_available() -> bool:
    """True when this PyTorch build has NNPACK for this CPU (the call also initialises it)."""
    try:
        return bool(torch.backends.nnpack.is_available())
    except Exception:  # pragma: no cover - exotic builds
        return False


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, dilation 1, zero padding) that runs its eligible CPU
    inference calls as NNPACK Winograd; everything else as the plain convolution."""

    min_pixels = MIN_PIXELS

    def _eligible(self, x: Tensor) -> bool:
        return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.dim() == 4 and x.shape[0] == 1
                and x.shape[-2] * x.shape[-1] >= self.min_pixels and x.is_contiguous()
                and self.weight.is_contiguous() and not torch.is_autocast_enabled("cpu"))

    def forward(self, x: Tensor) -> Tensor:
        if not self._eligible(x):
            return super().forward(x)
        bias = self.bias
        if bias is None:  # NNPACK needs one
            bias = x.new_zeros(self.out_channels)
        return torch._nnpack_spatial_convolution(x, self.weight, bias, list(self.padding))


def _convertible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and m.padding == (1, 1))


def use_winograd(model: nn.Module) -> int:
    """Route ``model``'s 3x3 stride-1 convolutions through :class:`WinogradConv2d`, in place.
    Returns how many were converted. Raises RuntimeError when this build has no NNPACK."""
    if not winograd_available():
        raise RuntimeError("Winograd convolutions need PyTorch's NNPACK, which this build or CPU does not "
                           "have (torch.backends.nnpack.is_available() is False); run without --winograd")
    n = 0
    for m in model.modules():
        if _convertible(m):
            m.__class__ = WinogradConv2d
            n += 1
    return n
