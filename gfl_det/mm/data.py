"""The data side of the adapter: MMDetection's pipeline steps, datasets, sampler and collate
function under the names configs use, built from gfl_det's plain-PyTorch data classes."""
from __future__ import annotations

import os.path as osp
from typing import Any, Iterator, Sequence

from mmengine.dataset import DefaultSampler as _MMDefaultSampler
from mmengine.dataset import InfiniteSampler as _MMInfiniteSampler
from mmengine.dist import barrier, get_rank

from .. import data as gdata
from .registry import DATA_SAMPLERS, DATASETS, FUNCTIONS, TRANSFORMS

__all__ = ['build_pipeline', 'CocoDetDataset', 'SyntheticCocoDataset', 'DefaultSampler', 'InfiniteSampler']


class _Implicit:
    """A pipeline step that gfl_det does elsewhere (decode and pack: in the dataset)."""

    def __init__(self, name: str):
        self.name = name


def _implicit(name: str, what: str):
    def make(**kwargs) -> _Implicit:
        return _Implicit(name)
    make.__doc__ = f'mmdet ``{name}``: accepted; {what}'
    make.__name__ = name
    return make


TRANSFORMS.register_module(name='LoadImageFromFile',
                           module=_implicit('LoadImageFromFile', 'the dataset decodes (cv2, RGB).'))
TRANSFORMS.register_module(name='PackDetInputs',
                           module=_implicit('PackDetInputs', 'the dataset packs the sample.'))


@TRANSFORMS.register_module(name='LoadAnnotations')
def _load_annotations(with_bbox: bool = True, with_label: bool = True, with_mask: bool = False,
                      with_seg: bool = False, **unused: Any) -> _Implicit:
    """mmdet ``LoadAnnotations``: boxes and labels are always loaded by the dataset."""
    if with_mask or with_seg or not with_bbox:
        raise NotImplementedError('gfl_det is a box detector: LoadAnnotations(with_bbox=True) only')
    return _Implicit('LoadAnnotations')


@TRANSFORMS.register_module(name='Resize')
def _resize(scale: Sequence[int], keep_ratio: bool = True, **unused: Any) -> gdata.KeepRatioResize:
    """mmdet ``Resize(scale=(long, short), keep_ratio=True)``."""
    if not keep_ratio:
        raise NotImplementedError('Resize(keep_ratio=False) is not supported; gfl_det resizes '
                                  'keeping the aspect ratio, as every GFL config does')
    return gdata.KeepRatioResize(tuple(scale))


@TRANSFORMS.register_module(name='RandomResize')
def _random_resize(scale: Sequence[Sequence[int]], keep_ratio: bool = True,
                   **unused: Any) -> gdata.KeepRatioResize:
    """mmdet ``RandomResize(scale=[(1333, 480), (1333, 960)], keep_ratio=True)``: each edge of
    the target scale drawn uniformly from its range."""
    if not keep_ratio:
        raise NotImplementedError('RandomResize(keep_ratio=False) is not supported')
    return gdata.KeepRatioResize(ms_range=[tuple(s) for s in scale])


@TRANSFORMS.register_module(name='RandomFlip')
def _random_flip(prob: float = 0.5, direction: str = 'horizontal', **unused: Any) -> gdata.RandomFlip:
    """mmdet ``RandomFlip(prob=0.5)`` (horizontal)."""
    if direction != 'horizontal':
        raise NotImplementedError("RandomFlip supports direction='horizontal' only")
    return gdata.RandomFlip(prob)


TRANSFORMS.register_module(name='PhotoMetricDistortion', module=gdata.PhotoMetricDistortion)


def build_pipeline(pipeline: Sequence[dict] | None) -> gdata.Compose:
    """An MMDetection pipeline list -> :class:`gfl_det.data.Compose` of our transforms.

    Image decoding, annotation loading and packing happen in the dataset; the matching steps are
    accepted and skipped. An unsupported step raises with the list of supported ones.
    """
    steps = []
    for cfg in pipeline or []:
        cfg = dict(cfg)
        try:
            step = TRANSFORMS.build(cfg)
        except KeyError as e:
            raise KeyError(f"pipeline step {cfg.get('type')!r} is not supported by gfl_det; "
                           f'supported: {sorted(TRANSFORMS.module_dict)}') from e
        if not isinstance(step, _Implicit):
            steps.append(step)
    return gdata.Compose(steps)


FUNCTIONS.register_module(name='gfl_collate', module=gdata.collate)


DATA_SAMPLERS.register_module(name='AspectRatioBatchSampler', module=gdata.AspectRatioBatchSampler)
DATA_SAMPLERS.register_module(name='IdentityBatchSampler', module=gdata.IdentityBatchSampler)


@DATA_SAMPLERS.register_module(name='DefaultSampler')
class DefaultSampler(_MMDefaultSampler):
    """mmengine's ``DefaultSampler`` (the order a function of (seed, epoch), set by
    ``DistSamplerSeedHook``) yielding :class:`gfl_det.data.SampleIndex`: each index carries the
    seed and epoch, from which the dataset draws the sample's augmentation -- so workers,
    persistent or not, and a resumed run see exactly the same data."""

    def __iter__(self) -> Iterator[gdata.SampleIndex]:
        seed, epoch = self.seed, self.epoch
        return iter([gdata.SampleIndex(i, seed, epoch) for i in super().__iter__()])


@DATA_SAMPLERS.register_module(name='InfiniteSampler')
class InfiniteSampler(_MMInfiniteSampler):
    """mmengine's ``InfiniteSampler`` yielding :class:`gfl_det.data.SampleIndex`; the n-th pass
    over the dataset counts as epoch n."""

    def _infinite_indices(self) -> Iterator[gdata.SampleIndex]:
        for k, i in enumerate(super()._infinite_indices()):
            yield gdata.SampleIndex(i, self.seed, k // self.size)


@DATASETS.register_module(name='CocoDataset')
class CocoDetDataset(gdata.CocoDataset):
    """:class:`gfl_det.data.CocoDataset` built from MMDetection's dataset keys.

    ``dict(type='CocoDataset', data_root='data/coco/', ann_file='annotations/x.json',
    data_prefix=dict(img='train2017/'), filter_cfg=dict(filter_empty_gt=True, min_size=32),
    pipeline=[...], test_mode=False)``. As in mmdet, ``filter_cfg=None`` filters nothing.
    ``metainfo=dict(classes=...)`` is checked against the JSON's categories (deviation: mmdet
    would keep only the listed classes; here they must be exactly the JSON's). Other keys go to
    :class:`gfl_det.data.CocoDataset` (``check_images``, ``on_bad_image``, ...).
    """

    def __init__(self, ann_file: str, data_root: str = '', data_prefix: dict | None = None,
                 pipeline: Sequence[dict] | None = None, test_mode: bool = False,
                 filter_cfg: dict | None = None, metainfo: dict | None = None,
                 backend_args: Any = None, serialize_data: Any = None, lazy_init: Any = None,
                 **kwargs: Any):
        img_dir = osp.join(data_root, (data_prefix or {}).get('img', ''))
        filter_cfg = dict(filter_cfg or {})
        super().__init__(osp.join(data_root, ann_file), img_dir, build_pipeline(pipeline),
                         test_mode=test_mode,
                         filter_empty_gt=bool(filter_cfg.get('filter_empty_gt', False)),
                         min_size=int(filter_cfg.get('min_size', 0)), **kwargs)
        wanted = (metainfo or {}).get('classes')
        if wanted is not None and tuple(wanted) != tuple(self.classes):
            raise ValueError(f'metainfo classes {tuple(wanted)} differ from the categories of '
                             f'{self.ann_file}: {self.classes} (gfl_det does not subset classes)')

    @property
    def metainfo(self) -> dict:
        """``classes`` (as mmdet) and the COCO ``cat_ids`` of labels 0..C-1 (plain data: it is
        saved in every checkpoint's ``meta['dataset_meta']``)."""
        return {'classes': tuple(self.classes), 'cat_ids': [int(c) for c in self.cat_ids]}


@DATASETS.register_module(name='SyntheticCocoDataset')
class SyntheticCocoDataset(CocoDetDataset):
    """A :class:`CocoDetDataset` on the synthetic shapes set, written under ``data_root`` first
    when missing (:func:`gfl_det.data.make_synthetic_coco`; idempotent, rank 0 writes).

    ``synthetic=dict(num_train=300, num_val=60, seed=0)`` are the generator's arguments; with
    ``train_ids_per_class`` / ``test_ids_per_class`` in it, the set with identities is written
    instead (:func:`gfl_det.data.synthetic_reid.make_synthetic_reid_coco`).
    """

    def __init__(self, data_root: str = 'data/synthetic/', synthetic: dict | None = None,
                 **kwargs: Any):
        if get_rank() == 0:
            synthetic = dict(synthetic or {})
            if {'train_ids_per_class', 'test_ids_per_class'} & set(synthetic):
                from ..data.synthetic_reid import make_synthetic_reid_coco
                make_synthetic_reid_coco(data_root, **synthetic)
            else:
                gdata.make_synthetic_coco(data_root, **synthetic)
        barrier()
        super().__init__(data_root=data_root, **kwargs)


@DATASETS.register_module(name='MultiViewDataset')
def _multi_view(dataset: dict, views: int = 2, view_pipeline: Sequence[dict] | None = None,
                seed: int | None = None) -> gdata.MultiViewDataset:
    """``dict(type='MultiViewDataset', views=2, dataset=dict(type='CocoDataset', ...))``: ``views``
    augmented views of every image in a batch (:class:`gfl_det.data.MultiViewDataset`; a batch of
    ``batch_size`` images holds ``views x batch_size`` samples). The inner dataset gets
    ``identities='annotation'`` unless it says otherwise; ``view_pipeline`` (pipeline steps) and
    ``seed`` make augmented views of a deterministic test pipeline, the same in every run."""
    inner = dict(dataset)
    inner.setdefault('identities', 'annotation')
    return gdata.MultiViewDataset(DATASETS.build(inner), views,
                                  build_pipeline(view_pipeline) if view_pipeline else None, seed)
