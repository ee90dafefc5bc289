"""Batching samples into the contract's batch (padded images, padded ground truth + mask)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ['collate']


def _round_up(x: int, d: int) -> int:
    return -(-int(x) // d) * d


def collate(samples: Sequence[dict], size_divisor: int = 32) -> dict:
    """Stack contract samples into a batch.

    Returns::

        {'inputs':    uint8 (B, 3, Hb, Wb), zero padded at bottom/right; Hb, Wb = the largest
                      h, w of the batch rounded up to a multiple of ``size_divisor``,
         'gt_boxes':  float32 (B, G, 4), G = most boxes in one image (may be 0); padding 0,
         'gt_labels': int64 (B, G); padding -1 (never a class: misuse fails loudly),
         'gt_valid':  bool (B, G); True for the real boxes,
         'metas':     list of B meta dicts (copies) with 'pad_shape' (own img_shape rounded up
                      to the divisor) and 'batch_input_shape' (Hb, Wb) added}
    """
    if len(samples) == 0:
        raise ValueError('collate got an empty list of samples')
    B = len(samples)
    d = int(size_divisor)
    hs = [int(s['image'].shape[-2]) for s in samples]
    ws = [int(s['image'].shape[-1]) for s in samples]
    Hb, Wb = _round_up(max(hs), d), _round_up(max(ws), d)
    G = max(int(s['boxes'].shape[0]) for s in samples)

    img0 = samples[0]['image']
    shape = (B, img0.shape[0], Hb, Wb)
    if torch.utils.data.get_worker_info() is not None:
        # in a DataLoader worker: build the batch directly in shared memory, as torch's
        # default_collate does, so sending it to the main process copies nothing
        try:
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * img0.element_size())
            inputs = torch.empty(0, dtype=img0.dtype).set_(storage).view(shape).zero_()
        except (AttributeError, RuntimeError):   # private API moved: fall back to a plain copy
            inputs = img0.new_zeros(shape)
    else:
        inputs = img0.new_zeros(shape)                               # (B, 3, Hb, Wb)
    gt_boxes = torch.zeros((B, G, 4), dtype=torch.float32)           # (B, G, 4)
    gt_labels = torch.full((B, G), -1, dtype=torch.int64)            # (B, G)
    gt_valid = torch.zeros((B, G), dtype=torch.bool)                 # (B, G)
    metas = []
    for i, s in enumerate(samples):
        img = s['image']
        inputs[i, :, :img.shape[-2], :img.shape[-1]] = img
        n = int(s['boxes'].shape[0])
        gt_boxes[i, :n] = s['boxes']
        gt_labels[i, :n] = s['labels']
        gt_valid[i, :n] = True
        meta = dict(s['meta'])
        meta['pad_shape'] = (_round_up(hs[i], d), _round_up(ws[i], d))
        meta['batch_input_shape'] = (Hb, Wb)
        metas.append(meta)
    return {'inputs': inputs, 'gt_boxes': gt_boxes, 'gt_labels': gt_labels,
            'gt_valid': gt_valid, 'metas': metas}
