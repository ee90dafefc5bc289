"""Feature Pyramid Network with MMDetection's module names and behaviour.

P3..P5 from C3..C5 (``start_level=1``): 1x1 laterals, top-down nearest upsampling to the exact
size of the finer map, 3x3 output convs; P6 = 3x3/s2 conv on the P5 *output*
(``add_extra_convs='on_output'``), P7 = 3x3/s2 conv on P6, no ReLU in between.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class ConvBlock(nn.Module):
    """A conv named ``conv`` (mmcv ConvModule without norm/activation keeps this key)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class FPN(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, start_level: int = 1,
                 num_outs: int = 5, add_extra_convs: str = "on_output"):
        super().__init__()
        if add_extra_convs != "on_output":
            raise NotImplementedError(f"FPN add_extra_convs={add_extra_convs!r}: only 'on_output' (GFL's) is supported")
        self.start_level, self.out_channels = start_level, out_channels
        used = list(in_channels[start_level:])
        self.lateral_convs = nn.ModuleList(ConvBlock(c, out_channels, 1) for c in used)
        convs = [ConvBlock(out_channels, out_channels, 3) for _ in used]
        convs += [ConvBlock(out_channels, out_channels, 3, stride=2) for _ in range(num_outs - len(used))]
        self.fpn_convs = nn.ModuleList(convs)
        self.num_outs = num_outs
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # mmdet: Xavier uniform, bias 0
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        lat = [conv(feats[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        outs = [self.fpn_convs[i](x) for i, x in enumerate(lat)]
        for conv in self.fpn_convs[len(lat):]:
            outs.append(conv(outs[-1]))
        return outs
