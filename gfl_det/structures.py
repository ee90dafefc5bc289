"""The named contracts between the detector's parts.

Legend: B images, G ground-truth boxes per image (padded to the batch's largest count),
C classes, R = reg_max (distribution bins 0..R), H_l x W_l the map of level l, D the embedding
dimension.

* :class:`HeadOutputs` -- what the head predicts (the head only predicts: ``criterion.py`` turns
  it into losses, ``postprocess.py`` into detections). Later heads add optional fields.
* :class:`Targets` -- a batch's ground truth, padded, as ``gfl_det.data.collate`` makes it; the
  mmengine adapter moves it to the device and hands it to the criterion untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor

__all__ = ['HeadOutputs', 'Targets']


@dataclass
class HeadOutputs:
    """Per-level head outputs, levels ordered P3 -> P7 (finest first)."""

    cls: list[Tensor]  # [(B, C, H_l, W_l)] joint class-quality logits (sigmoid = score x IoU)
    reg: list[Tensor]  # [(B, 4 (R + 1), H_l, W_l)] edge distributions, channel side * (R + 1) + bin
    #                    sides (left, top, right, bottom), already multiplied by the level's Scale
    embed: Optional[list[Tensor]] = None  # [(B, C', H_l, W_l)] the maps of the identity-embedding
    #                    branch (only with ``bbox_head.embed``): ``bbox_head.embed.rows(embed, b, a)``
    #                    gives the (N, D) unit embeddings of the rows read (models/embed_head.py)

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [tuple(c.shape[-2:]) for c in self.cls]

    @property
    def num_classes(self) -> int:
        return self.cls[0].shape[1]

    @property
    def reg_max(self) -> int:
        return self.reg[0].shape[1] // 4 - 1


@dataclass
class Targets:
    """Padded ground truth of a batch. Padding entries have ``valid`` False, box 0, label -1."""

    boxes: Tensor  # (B, G, 4) float32 xyxy in network-input pixels
    labels: Tensor  # (B, G) int64 in [0, C); -1 for padding (never a class: misuse fails loudly)
    valid: Tensor  # (B, G) bool, True for the real boxes
    ids: Optional[Tensor] = None  # (B, G) int64 identity of each box (-1 unknown), when the data has one

    def to(self, device: torch.device | str, non_blocking: bool = False) -> 'Targets':
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> 'Targets':
        """Called by the DataLoader (``pin_memory=True``) for objects that define it."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> 'Targets':
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    @property
    def num_images(self) -> int:
        return self.valid.shape[0]

    @classmethod
    def from_lists(cls, boxes: list[Tensor], labels: list[Tensor],
                   ids: Optional[list[Tensor]] = None) -> 'Targets':
        """Pad per-image ``boxes`` [(n_i, 4)], ``labels`` [(n_i,)] (and ``ids``) into a batch."""
        B = len(boxes)
        G = max([len(b) for b in boxes] + [0])
        out = cls(torch.zeros(B, G, 4), torch.full((B, G), -1, dtype=torch.int64),
                  torch.zeros(B, G, dtype=torch.bool),
                  None if ids is None else torch.full((B, G), -1, dtype=torch.int64))
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            n = len(b)
            out.boxes[i, :n] = torch.as_tensor(b, dtype=torch.float32).reshape(n, 4)
            out.labels[i, :n] = torch.as_tensor(lab, dtype=torch.int64)
            out.valid[i, :n] = True
            if ids is not None:
                out.ids[i, :n] = torch.as_tensor(ids[i], dtype=torch.int64)
        return out
