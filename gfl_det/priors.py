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
    # the same, as tensors made once per shape (make_priors caches them), so that the criterion
    # and ATSS work on every level at once
    centres: Tensor = None      # (A, 2) points in units of their stride (the grid's (col, row))
    level: Tensor = None        # (A,) long: the level of each prior
    level_hw: Tensor = None     # (L, 2) long: (H_l, W_l)
    level_stride: Tensor = None  # (L,) long
    level_start: Tensor = None  # (L,) long: index of the level's first prior

    def boxes(self, octave_base_scale: float = 8.0) -> Tensor:
        """(A, 4) ATSS anchor squares of side octave_base_scale * stride."""
        half = self.strides[:, None] * (octave_base_scale / 2)
        return torch.cat([self.points - half, self.points + half], 1)

    def valid_extent(self, pad_shapes: Tensor) -> Tensor:
        """(B, L, 2) long: the valid (rows, cols) of every level for every image, from its own
        padded shape (pad_shapes (B, 2) = h, w): ceil(pad / stride), at most the map's size."""
        s = self.level_stride[:, None]  # (L, 1)
        return torch.minimum((pad_shapes.long()[:, None, :] + s - 1) // s, self.level_hw)

    def valid_mask(self, pad_shapes: Tensor) -> Tensor:
        """(B, A) bool: prior lies inside the image's own padded shape (pad_shapes (B, 2) = h, w).

        A row i is valid iff i < ceil(pad_h / s) (and likewise for columns), as mmdet's
        ``valid_flags``: priors beyond an image's own pad_shape (in the batch padding) are ignored.
        """
        extent = self.valid_extent(pad_shapes)[:, self.level]  # (B, A, 2) rows, cols of the prior's level
        return (self.centres.flip(-1) < extent).all(-1)  # (row, col) inside

    def valid_rows_cols(self, pad_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) number of valid rows and columns of every level for every image."""
        return self.valid_extent(pad_shapes).unbind(-1)


_CACHE: dict = {}


def make_priors(feat_sizes: Sequence[tuple[int, int]], strides: Sequence[int],
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Priors:
    """Priors of all levels for feature maps of the given (H_l, W_l). Cached per shapes/device.

    Under ``torch.compile`` the sizes are symbolic and the priors are part of the traced graph
    (no cache lookup: hashing the sizes would specialise them, one compilation per image shape).
    """
    compiling = torch.compiler.is_compiling()
    key = (tuple(map(tuple, feat_sizes)), tuple(strides), str(device), dtype)
    hit = None if compiling else _CACHE.get(key)
    if hit is not None:
        return hit
    pts, st = [], []
    for (h, w), s in zip(feat_sizes, strides):
        ys = torch.arange(h, device=device, dtype=dtype) * s
        xs = torch.arange(w, device=device, dtype=dtype) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
        st.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    sizes = [tuple(x) for x in feat_sizes]
    counts = [h * w for h, w in sizes]
    points, strides_a = torch.cat(pts), torch.cat(st)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    pri = Priors(points, strides_a, sizes, list(strides), counts,
                 centres=points / strides_a[:, None],
                 # sizes from the host without a sync: pinned, non-blocking copies (gfl_det/host.py),
                 # and repeat_interleave told its output size
                 level=torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                               host_tensor(counts, device), output_size=sum(counts)),
                 level_hw=host_tensor(sizes, device, torch.long).reshape(-1, 2),
                 level_stride=host_tensor(list(strides), device, torch.long),
                 level_start=host_tensor(starts, device, torch.long))
    if compiling:
        return pri
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[key] = pri
    return pri
