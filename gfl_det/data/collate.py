"""Batching samples into the contract's batch (padded images, padded ground truth + mask)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..structures import Targets

__all__ = ['collate']


def _round_up(x: int, d: int) -> int:
    return -(-int(x) // d) * d


def collate(samples: Sequence[dict], size_divisor: int = 32) -> dict:
    """Stack contract samples (or lists of them: the views of one image) into a batch.

    Returns::

        {'inputs':  uint8 (B, 3, Hb, Wb), zero padded at bottom/right; Hb, Wb = the largest
                    h, w of the batch rounded up to a multiple of ``size_divisor``,
         'targets': gfl_det.structures.Targets: boxes (B, G, 4) float32 (G = most boxes in one
                    image, may be 0; padding 0), labels (B, G) int64 (padding -1), valid (B, G)
                    bool, ids (B, G) int64 when every sample has 'ids' (else None),
         'metas':   list of B meta dicts (copies) with 'pad_shape' (own img_shape rounded up
                    to the divisor) and 'batch_input_shape' (Hb, Wb) added}
    """
    # MultiViewDataset (views.py) gives a list of views per image: they are samples side by side
    samples = [v for s in samples for v in (s if isinstance(s, (list, tuple)) else [s])]
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
    targets = Targets(torch.zeros((B, G, 4), dtype=torch.float32),    # (B, G, 4)
                      torch.full((B, G), -1, dtype=torch.int64),      # (B, G)
                      torch.zeros((B, G), dtype=torch.bool),          # (B, G)
                      torch.full((B, G), -1, dtype=torch.int64) if all('ids' in s for s in samples) else None)
    metas = []
    for i, s in enumerate(samples):
        img = s['image']
        inputs[i, :, :img.shape[-2], :img.shape[-1]] = img
        n = int(s['boxes'].shape[0])
        targets.boxes[i, :n] = s['boxes']
        targets.labels[i, :n] = s['labels']
        targets.valid[i, :n] = True
        if targets.ids is not None:
            targets.ids[i, :n] = s['ids']
        meta = dict(s['meta'])
        meta['pad_shape'] = (_round_up(hs[i], d), _round_up(ws[i], d))
        meta['batch_input_shape'] = (Hb, Wb)
        metas.append(meta)
    return {'inputs': inputs, 'targets': targets, 'metas': metas}
