"""GFL head: convolutions only. Losses live in ``criterion.py``, decoding in ``postprocess.py``.

Per level: ``stacked_convs`` conv3x3 (no bias) + GroupNorm(32) + ReLU towers for cls and reg,
``gfl_cls`` -> C joint class-quality logits, ``gfl_reg`` -> 4 (R + 1) distribution logits,
multiplied by the level's learnable Scale (MMDetection scales the *logits*).
Output channel of side s (left, top, right, bottom) and bin b is ``s * (R + 1) + b``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..structures import HeadOutputs


class ConvGN(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.gn = nn.GroupNorm(groups, cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.gn(self.conv(x)))


class Scale(nn.Module):
    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class Integral(nn.Module):
    """Holds MMDetection's ``project`` buffer (the bins 0..R), so that the state dict has its key
    ``bbox_head.integral.project`` and checkpoints load both ways. The integral itself --
    softmax(logits) . [0..R] -- is :func:`gfl_det.postprocess.integral`."""

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))


class GFLHead(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 256,
                 stacked_convs: int = 4, reg_max: int = 16, strides: Sequence[int] = (8, 16, 32, 64, 128),
                 num_groups: int = 32, prior_prob: float = 0.01):
        super().__init__()
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, tuple(strides)
        self.cls_convs = nn.ModuleList(
            ConvGN(in_channels if i == 0 else feat_channels, feat_channels, num_groups) for i in range(stacked_convs))
        self.reg_convs = nn.ModuleList(
            ConvGN(in_channels if i == 0 else feat_channels, feat_channels, num_groups) for i in range(stacked_convs))
        self.gfl_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(feat_channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        self.integral = Integral(reg_max)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - prior_prob) / prior_prob))
        self.embed = None  # optional identity-embedding tower (embed_head.py), set by build_detector

    def forward(self, feats: Sequence[Tensor]) -> HeadOutputs:
        """FPN maps -> cls logits [(B, C, H_l, W_l)], reg logits [(B, 4(R+1), H_l, W_l)] (and the
        embedding branch's maps when the head has an ``embed`` tower: see embed_head.py)."""
        cls_out, reg_out = [], []
        for x, scale in zip(feats, self.scales):
            c, r = x, x
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            cls_out.append(self.gfl_cls(c))
            reg_out.append(scale(self.gfl_reg(r)))
        return HeadOutputs(cls_out, reg_out, None if self.embed is None else self.embed(feats))
