"""Several independently augmented views of every image in one batch (``views=2``): with every
annotation its own identity (``CocoDataset(identities='annotation')``), the embedding loss learns
to find each object again across augmentations -- instance discrimination from static images,
for data that has no identities. Also the evaluation of that: ``tools/test.py`` on a two-view set
reports how often a detection's nearest detection in the other view is its counterpart.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from torch.utils.data import Dataset

from .coco import to_sample

__all__ = ['MultiViewDataset']


class MultiViewDataset(Dataset):
    """``views`` independently augmented views of every image of ``dataset`` (which must carry
    identities: ``identities='annotation'`` for data without them).

    ``dataset[i]`` is a list of ``views`` samples of image i, each with ``meta['view']`` = its
    number; :func:`gfl_det.data.collate` flattens the lists, so **a batch of ``batch_size``
    images holds ``views x batch_size`` samples** (images x views), the views of an image next to
    each other. In training each view is the dataset's own (random) pipeline run again; for a
    deterministic evaluation pipeline give ``view_transforms`` (random augmentations applied to
    every view after the dataset's transforms) and ``seed``: the views are then the same in every
    run (numpy's generator is seeded per (seed, image, view) and restored afterwards).

    Everything else (``aspect_flags``, ``metainfo``, ``skipped``, ...) is the wrapped dataset's.
    """

    def __init__(self, dataset: Dataset, views: int = 2, view_transforms: Optional[Callable] = None,
                 seed: Optional[int] = None):
        if views < 1:
            raise ValueError(f'views must be >= 1, got {views}')
        if getattr(dataset, 'identities', None) is None:
            raise ValueError('MultiViewDataset needs a dataset with identities (CocoDataset(identities='
                             "'annotation') makes every annotation its own identity)")
        self.dataset, self.views, self.view_transforms, self.seed = dataset, int(views), view_transforms, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name.startswith('__') or name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, idx: int) -> list[dict]:
        return [self._view(idx, v) for v in range(self.views)]

    def _view(self, idx: int, view: int) -> dict:
        state = None
        if self.seed is not None:
            state = np.random.get_state()
            np.random.seed([int(self.seed), int(idx), view])
        try:
            sample = self.dataset[idx]
            if self.view_transforms is not None:
                sample = to_sample(self.view_transforms(_to_results(sample)))
        finally:
            if state is not None:
                np.random.set_state(state)
        sample['meta'] = dict(sample['meta'], view=view)
        return sample


def _to_results(sample: dict) -> dict:
    """A sample (torch, CHW) back to the transforms' numpy results dict."""
    out = {k: v.numpy() for k, v in sample.items() if k in ('boxes', 'labels', 'ids')}
    return dict(out, image=np.ascontiguousarray(sample['image'].permute(1, 2, 0).numpy()),
                meta=dict(sample['meta']))

