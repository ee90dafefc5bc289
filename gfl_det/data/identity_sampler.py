"""Batches in which identities meet again: the P x K sampling of metric learning, for images that
hold several objects each.

A randomly drawn batch of 8 images holds some 24 objects; with 100 training identities two of them
rarely share one (about 3 pairs a batch), so a triplet loss mostly sees positives that are the same
object at neighbouring priors -- it learns to tell objects apart, not to recognise one identity in
another appearance. :class:`IdentityBatchSampler` fills each batch with groups of
``images_per_identity`` (K) images that share an identity, P = batch_size / K groups a batch
(FaceNet's "around 40 faces per identity per mini-batch", Hermans et al.'s P x K batches).

Every index of the sampler is used exactly once per epoch (so the epoch has ``ceil(n / B)``
batches on every process, like :class:`gfl_det.data.AspectRatioBatchSampler`); which identities
open the groups is drawn from the sampler's own (seeded, per epoch) order.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import BatchSampler, Sampler

__all__ = ['IdentityBatchSampler', 'identities_per_image']


def identities_per_image(dataset) -> list[np.ndarray]:
    """Per dataset index, the identities of its boxes (a dataset with ``identities``)."""
    if getattr(dataset, 'identities', None) is None:
        raise ValueError('IdentityBatchSampler needs a dataset with identities (CocoDataset(identities=...))')
    return [np.unique(dataset.get_ann_info(i)['ids']) for i in range(len(dataset))]


class IdentityBatchSampler(BatchSampler):
    """Args:
        sampler: yields this process's dataset indices (torch or mmengine sampler, shuffled per epoch).
        batch_size: images per batch.
        drop_last: drop the incomplete last batch.
        images_per_identity: K, images sharing an identity put next to each other.
        image_ids: per dataset index its identities (default: read from the sampler's dataset).
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False,
                 images_per_identity: int = 4, image_ids: Optional[Sequence[np.ndarray]] = None):
        if batch_size < 1 or images_per_identity < 1:
            raise ValueError(f'batch_size ({batch_size}) and images_per_identity ({images_per_identity}) must be >= 1')
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), bool(drop_last)
        self.k = int(images_per_identity)
        if image_ids is None:
            dataset = getattr(sampler, 'dataset', None) or getattr(sampler, 'data_source', None)
            if dataset is None:
                raise TypeError('IdentityBatchSampler: the sampler has no .dataset / .data_source; pass image_ids=')
            image_ids = identities_per_image(dataset)
        self.image_ids = list(image_ids)

    def __iter__(self) -> Iterator[list[int]]:
        order = [int(i) for i in self.sampler]
        images_of: dict[int, list[int]] = {}
        for i in order:  # in the sampler's (random) order
            for k in self.image_ids[i]:
                images_of.setdefault(int(k), []).append(i)
        # identities in the order their first image comes: a fresh random order every epoch
        unused, batch = dict.fromkeys(order), []
        for k in images_of:
            group = [i for i in images_of[k] if i in unused][:self.k]
            if len(group) < 2:
                continue  # an identity seen once left: its image comes later, with the rest
            for i in group:
                del unused[i]
                batch.append(i)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        for i in list(unused):
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
