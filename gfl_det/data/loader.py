"""Batch sampling, DataLoader construction, and where each sample's randomness comes from.

* :class:`SampleIndex` / :func:`sample_rng` -- a dataset index that carries the (seed, epoch)
  it was drawn for; the dataset derives that sample's augmentation generator from (seed, epoch,
  index) alone. So a sample's augmentation does not depend on which process, worker or
  position draws it: runs with 0, 1 or 8 workers, persistent or not, and a run resumed at an
  epoch boundary all see exactly the same data. Samplers yield them
  (:class:`EpochSampler`, and the mmengine adapter's ``DefaultSampler`` / ``InfiniteSampler``);
  a plain ``int`` index still works (its generator then comes from numpy's global one).
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
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from .collate import collate

__all__ = ['AspectRatioBatchSampler', 'build_dataloader', 'worker_init_fn', 'aspect_flags_of',
           'SampleIndex', 'sample_rng', 'EpochSampler']


class SampleIndex(int):
    """A dataset index (an ``int``: any dataset accepts it) that also carries the ``seed`` and
    ``epoch`` it was drawn for. It crosses into DataLoader worker processes with the index
    itself, so persistent workers learn the epoch without any state of their own."""

    def __new__(cls, index: int, seed: int, epoch: int) -> 'SampleIndex':
        obj = super().__new__(cls, index)
        obj.seed, obj.epoch = int(seed), int(epoch)
        return obj

    def __reduce__(self):
        return SampleIndex, (int(self), self.seed, self.epoch)

    def __repr__(self) -> str:
        return f'SampleIndex({int(self)}, seed={self.seed}, epoch={self.epoch})'


def sample_rng(index) -> np.random.Generator:
    """The random generator of one sample: from (seed, epoch, index) for a
    :class:`SampleIndex`; for a plain ``int`` (or None), seeded from numpy's global generator
    (which :func:`worker_init_fn` seeds per worker)."""
    if isinstance(index, SampleIndex):
        key = [index.seed % (1 << 64), index.epoch % (1 << 64), int(index) % (1 << 64)]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
    return np.random.default_rng(np.random.randint(0, 2 ** 32, dtype=np.uint64))


class EpochSampler(Sampler):
    """The indices of ``dataset`` as :class:`SampleIndex`, shuffled (``shuffle``) by a
    permutation of (seed, epoch) alone -- no generator state to carry across epochs or a resume.
    The epoch is what :meth:`set_epoch` last set, else the number of passes started so far."""

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0):
        self.data_source, self.n = dataset, len(dataset)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[SampleIndex]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                 .tolist() if self.shuffle else range(self.n))
        return iter([SampleIndex(i, self.seed, epoch) for i in order])

    def __len__(self) -> int:
        return self.n


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
            bucket.append(idx)  # as given: a SampleIndex keeps its (seed, epoch)
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
    """Seed numpy and ``random`` in a DataLoader worker from torch's worker seed (what a
    plain ``int`` index draws its augmentation from; a :class:`SampleIndex` does not need it).
    Also stops OpenCV from starting its own thread pool in each worker (the workers are the
    parallelism). ``**unused`` accepts mmengine's ``num_workers/rank/seed`` keywords.
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
        seed: with the epoch, seeds the shuffling and every sample's augmentation
            (:class:`EpochSampler`; the same batches with any ``num_workers``).
        aspect_ratio_grouping: :class:`AspectRatioBatchSampler` (batches of one orientation).
        drop_last: drop incomplete batches.
        pin_memory: page-locked batches for fast host-to-GPU copies (default: CUDA present).
        persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        prefetch_factor: batches each worker prepares ahead.
        size_divisor: pad batches to a multiple of this.
        sampler: index sampler to use instead of the default :class:`EpochSampler` (shuffled
            in training, in order otherwise).
    """
    if sampler is None:
        sampler = EpochSampler(dataset, shuffle=train, seed=seed)
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
