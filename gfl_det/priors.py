"""Priors (anchor points) for every FPN level, computed from the real feature-map shapes.

Legend: L levels, A = sum_l H_l * W_l priors, B images.
Prior (i, j) of a level with stride s sits at (j * s, i * s) -- no half-cell offset, as
MMDetection's AnchorGenerator (center_offset 0); its ATSS anchor box is the square of side
``octave_base_scale * s`` centred there. Flattening order is (level, y, x).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .host import host_tensor


@dataclass
class Priors:
    points: Tensor          # (A, 2) x, y in input pixels
    strides: Tensor         # (A,) float stride of each prior
    level_sizes: list[tuple[int, int]]  # [(H_l, W_l)]
    level_strides: list[int]
    num_level: list[int]    # [A_l]

    def boxes(self, octave_base_scale: float = 8.0) -> Tensor:
        """(A, 4) ATSS anchor squares of side octave_base_scale * stride."""
        half = self.strides[:, None] * (octave_base_scale / 2)
        return torch.cat([self.points - half, self.points + half], 1)

    def valid_mask(self, pad_shapes: Tensor) -> Tensor:
        """(B, A) bool: prior lies inside the image's own padded shape (pad_shapes (B, 2) = h, w).

        A row i is valid iff i < ceil(pad_h / s) (and likewise for columns), as mmdet's
        ``valid_flags``: priors beyond an image's own pad_shape (in the batch padding) are ignored.
        """
        rows, cols = self.valid_rows_cols(pad_shapes)  # (B, L) each
        out = []
        for l, (h, w) in enumerate(self.level_sizes):
            dev = pad_shapes.device
            r = torch.arange(h, device=dev)[None, :, None] < rows[:, l, None, None]
            c = torch.arange(w, device=dev)[None, None, :] < cols[:, l, None, None]
            out.append((r & c).flatten(1))
        return torch.cat(out, 1)

    def valid_rows_cols(self, pad_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) number of valid rows and columns of every level for every image."""
        s = host_tensor(self.level_strides, pad_shapes.device, torch.long)
        hw = host_tensor(self.level_sizes, pad_shapes.device, torch.long)  # (L, 2)
        ps = pad_shapes.long()
        rows = torch.minimum((ps[:, 0:1] + s - 1) // s, hw[:, 0])
        cols = torch.minimum((ps[:, 1:2] + s - 1) // s, hw[:, 1])
        return rows, cols


_CACHE: dict = {}


def make_priors(feat_sizes: Sequence[tuple[int, int]], strides: Sequence[int],
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Priors:
    """Priors of all levels for feature maps of the given (H_l, W_l). Cached per shapes/device."""
    key = (tuple(map(tuple, feat_sizes)), tuple(strides), str(device), dtype)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    pts, st = [], []
    for (h, w), s in zip(feat_sizes, strides):
        ys = torch.arange(h, device=device, dtype=dtype) * s
        xs = torch.arange(w, device=device, dtype=dtype) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
        st.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    pri = Priors(torch.cat(pts), torch.cat(st), [tuple(x) for x in feat_sizes], list(strides),
                 [h * w for h, w in feat_sizes])
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[key] = pri
    return pri
