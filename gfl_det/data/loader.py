"""Batch sampling and DataLoader construction.

* :class:`AspectRatioBatchSampler` -- batches only images of the same orientation (portrait
  vs landscape), like mmdet's, so padding stays small. Constructible the way mmengine's Runner
  builds ``batch_sampler=dict(type=...)``: ``__init__(sampler, batch_size, drop_last=False)``.
* :func:`build_dataloader` -- the plain-PyTorch loader: decoding and augmentation in worker
  processes, pinned memory, persistent workers, seeded workers.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, RandomSampler, Sampler,
                              SequentialSampler)

from .collate import collate

__all__ = ['AspectRatioBatchSampler', 'build_dataloader', 'worker_init_fn', 'aspect_flags_of']


def aspect_flags_of(dataset) -> np.ndarray:
    """(N,) uint8, 1 = landscape or square (w >= h), 0 = portrait, from a dataset's metadata
    (``aspect_flags``, ``img_shapes`` (N, 2) h/w, or mmengine-style ``get_data_info(i)`` with
    width/height) -- never by loading images."""
    flags = getattr(dataset, 'aspect_flags', None)
    if flags is not None:
        return np.asarray(flags, np.uint8)
    shapes = getattr(dataset, 'img_shapes', None)
    if shapes is not None:
        shapes = np.asarray(shapes)
        return (shapes[:, 1] >= shapes[:, 0]).astype(np.uint8)
    if hasattr(dataset, 'get_data_info'):
        return np.array([int(dataset.get_data_info(i)['width'] >= dataset.get_data_info(i)[
            'height']) for i in range(len(dataset))], np.uint8)
    raise TypeError(f'{type(dataset).__name__} has no aspect_flags / img_shapes / get_data_info;'
                    ' AspectRatioBatchSampler needs the image sizes (or pass aspect_flags=)')


class AspectRatioBatchSampler(BatchSampler):
    """Group indices from ``sampler`` into batches of one orientation, as MMDetection's.

    Indices are dealt into two buckets (w >= h, w < h) in the order the sampler yields them; a
    bucket is emitted as soon as it holds ``batch_size`` indices. At the end of the sampler the
    two remainders are put together and cut into batches (so at most one batch of an epoch mixes
    orientations), the last one smaller unless ``drop_last`` drops it.

    Why merge the remainders: every rank of a distributed run must make the same number of steps
    per epoch (DDP's all-reduce otherwise waits forever at the end of the epoch). Emitting each
    bucket's remainder on its own would make the count depend on the orientation mix of each
    rank's share; merging makes it exactly ``ceil(n / batch_size)`` (``floor`` with
    ``drop_last``) on every rank, and ``len()`` exact.

    Args:
        sampler: yields dataset indices (torch or mmengine sampler); its ``dataset`` /
            ``data_source`` gives the image sizes unless ``aspect_flags`` is given.
        batch_size: images per batch.
        drop_last: drop the incomplete batch.
        aspect_flags: optional (N,) 0/1 per dataset index.
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False,
                 aspect_flags: Optional[Sequence[int]] = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        if aspect_flags is None:
            dataset = getattr(sampler, 'dataset', None)
            if dataset is None:
                dataset = getattr(sampler, 'data_source', None)
            if dataset is None:
                raise TypeError('AspectRatioBatchSampler: the sampler has no .dataset / '
                                '.data_source; pass aspect_flags=')
            aspect_flags = aspect_flags_of(dataset)
        self.flags = np.asarray(aspect_flags, np.uint8)

    def __iter__(self) -> Iterator[list[int]]:
        buckets: list[list[int]] = [[], []]
        for idx in self.sampler:
            bucket = buckets[self.flags[idx]]
            bucket.append(int(idx))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]
        left = buckets[0] + buckets[1]
        while left:
            if len(left) < self.batch_size and self.drop_last:
                break
            yield left[:self.batch_size]
            left = left[self.batch_size:]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def worker_init_fn(worker_id: int, **unused) -> None:
    """Seed numpy and ``random`` in a DataLoader worker from torch's worker seed.

    torch gives each worker ``base_seed + worker_id`` where ``base_seed`` is drawn from the
    loader's generator for every epoch: augmentations differ across workers and epochs and
    repeat exactly for the same loader seed. Also stops OpenCV from starting its own thread
    pool in each worker (the workers are the parallelism). ``**unused`` accepts mmengine's
    ``num_workers/rank/seed`` keywords.
    """
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
    try:
        import cv2
        cv2.setNumThreads(0)
    except ImportError:  # pragma: no cover
        pass


def build_dataloader(dataset: Dataset, batch_size: int = 2, *, train: bool = True,
                     num_workers: int = 2, seed: int = 0, aspect_ratio_grouping: bool = True,
                     drop_last: bool = False, pin_memory: Optional[bool] = None,
                     persistent_workers: bool = True, prefetch_factor: int = 2,
                     size_divisor: int = 32, sampler: Optional[Sampler] = None) -> DataLoader:
    """A DataLoader yielding contract batches.

    Args:
        dataset: e.g. :class:`gfl_det.data.CocoDataset`.
        batch_size: images per batch.
        train: shuffle (seeded) if True, dataset order if False.
        num_workers: worker processes decoding and augmenting (0 = in this process).
        seed: seeds the shuffling and the workers' augmentation streams.
        aspect_ratio_grouping: :class:`AspectRatioBatchSampler` (batches of one orientation).
        drop_last: drop incomplete batches.
        pin_memory: page-locked batches for fast host-to-GPU copies (default: CUDA present).
        persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        prefetch_factor: batches each worker prepares ahead.
        size_divisor: pad batches to a multiple of this.
        sampler: index sampler to use instead of the default random/sequential one.
    """
    if sampler is None:
        if train:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        else:
            sampler = SequentialSampler(dataset)
    if aspect_ratio_grouping:
        batch_sampler = AspectRatioBatchSampler(sampler, batch_size, drop_last=drop_last)
    else:
        batch_sampler = BatchSampler(sampler, batch_size, drop_last=drop_last)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    kwargs = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                      collate_fn=partial(collate, size_divisor=size_divisor),
                      pin_memory=pin_memory, worker_init_fn=worker_init_fn,
                      generator=torch.Generator().manual_seed(seed + 1), **kwargs)
