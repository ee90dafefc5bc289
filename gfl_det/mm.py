"""The one adapter between gfl_det and mmengine.

Everything mmengine-specific lives here; ``gfl_det.models``, ``gfl_det.data`` and
``gfl_det.evaluation`` stay plain PyTorch / numpy. Importing this module registers, in registries
of our own scope ``'gfl_det'`` (configs say ``default_scope = 'gfl_det'``), the pieces an
MMDetection-style config names:

==========================  ===================================================================
config ``type=``            what it builds
==========================  ===================================================================
``'GFL'``                   :class:`GFLDetector` -- IS :class:`gfl_det.models.GFL` (and an
                            mmengine ``BaseModel``); its state dict has MMDetection's keys
                            (``backbone.*``, ``neck.*``, ``bbox_head.*``), no wrapper prefix
``'DetDataPreprocessor'``   :class:`GFLDataPreprocessor` -- moves the collated batch to the
                            device (uint8 images; the model normalises on the device)
``'CocoDataset'``           :class:`CocoDetDataset` -- mmdet keys (data_root, ann_file,
                            data_prefix, filter_cfg, pipeline) -> :class:`gfl_det.data.CocoDataset`
``'SyntheticCocoDataset'``  the same, writing the synthetic shapes set first when it is missing
``'AspectRatioBatchSampler'``  :class:`AspectRatioBatchSampler` (equal batch counts on every rank)
``'gfl_collate'``           :func:`gfl_det.data.collate` (``collate_fn=dict(type='gfl_collate')``)
``'Resize'``, ``'RandomResize'``, ``'RandomFlip'``, ``'PhotoMetricDistortion'``,
``'LoadImageFromFile'``, ``'LoadAnnotations'``, ``'PackDetInputs'``: pipeline steps
``'CocoMetric'``            :class:`CocoMetric` -- pycocotools through :mod:`gfl_det.evaluation`
``'OptimWrapper'``,         mmengine's, with the gradient norm kept on the device until logged;
``'AmpOptimWrapper'``       AMP that also runs on the CPU (bfloat16)
``'DeferredRuntimeInfoHook'``  mmengine's RuntimeInfoHook with one host sync per log interval
``'DrawPredictionsHook'``   writes pictures of the predictions (``tools/test.py --show-dir``)
``'GFLRunner'``             :class:`GFLRunner` -- atomic, weights-only-safe checkpoints; trusted
                            resume, untrusted ``load_from``
==========================  ===================================================================

Checkpoint policy (torch >= 2.6 loads with ``weights_only=True`` by default, which mmengine
0.10.7 predates, so its own resume fails on its own files):

* :meth:`GFLRunner.save_checkpoint` writes with :func:`gfl_det.checkpoint.atomic_save` (a kill
  never leaves a half-written ``epoch_N.pth``) and stores only plain data: mmengine's MessageHub
  (``HistoryBuffer`` objects, numpy values) is encoded as plain dicts and lists. So every file
  our runner writes also loads with ``weights_only=True`` -- in tools/test.py, tools/demo.py,
  ``load_from`` and in MMDetection itself.
* :meth:`GFLRunner.resume` (``--resume``) loads our own work_dir checkpoints as TRUSTED
  (:func:`gfl_det.checkpoint.load_trusted`), so a checkpoint written by plain mmengine/mmdet
  resumes too.
* ``load_from`` and every other checkpoint (model zoo, fine-tuning) go through
  :func:`gfl_det.checkpoint.load_untrusted` (``weights_only=True``); we never fall back to
  unsafe loading.
"""
from __future__ import annotations

import contextlib
import copy
import os
import os.path as osp
import sys
import time
from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

import mmengine
from mmengine.dist import barrier, get_rank, master_only
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook, LoggerHook, RuntimeInfoHook
from mmengine.logging import HistoryBuffer, MessageHub, MMLogger
from mmengine.model import BaseDataPreprocessor, BaseModel, is_model_wrapper
from mmengine.optim import OptimWrapper as _MMOptimWrapper
from mmengine import registry as mmreg
from mmengine.registry import Registry
from mmengine.runner import Runner
from mmengine.runner.checkpoint import weights_to_cpu
from mmengine.utils import apply_to

from . import data as gdata
from .checkpoint import (atomic_save, capture_rng_state, find_latest_checkpoint, load_trusted,
                         load_untrusted, load_weights, remove_partial_saves, restore_rng_state)
from .evaluation import METRIC_NAMES, CocoEvaluator
from .guard import NonFiniteGuard, NonFiniteLossError
from .models import GFL, build_detector

__all__ = ['SCOPE', 'GFLDetector', 'GFLDataPreprocessor', 'CocoDetDataset', 'SyntheticCocoDataset',
           'AspectRatioBatchSampler', 'build_pipeline', 'CocoMetric', 'OptimWrapper', 'AmpOptimWrapper',
           'DeferredRuntimeInfoHook', 'DrawPredictionsHook', 'GFLRunner', 'encode_message_hub',
           'decode_message_hub', 'register_all_modules']

SCOPE = 'gfl_det'
_LOC = ['gfl_det.mm']


def _child(parent: Registry) -> Registry:
    return Registry(parent.name, parent=parent, scope=SCOPE, locations=_LOC)


# a child of every mmengine root registry, so that lookups in scope 'gfl_det' find ours first and
# fall back to mmengine's (SGD, LinearLR, LoggerHook, EpochBasedTrainLoop, ...) without warnings
MODELS = _child(mmreg.MODELS)
DATASETS = _child(mmreg.DATASETS)
DATA_SAMPLERS = _child(mmreg.DATA_SAMPLERS)
TRANSFORMS = _child(mmreg.TRANSFORMS)
FUNCTIONS = _child(mmreg.FUNCTIONS)
METRICS = _child(mmreg.METRICS)
HOOKS = _child(mmreg.HOOKS)
OPTIM_WRAPPERS = _child(mmreg.OPTIM_WRAPPERS)
RUNNERS = _child(mmreg.RUNNERS)
# mmengine imports '<scope>.registry' when it switches to a scope (mmdet has mmdet/registry.py);
# ours is this module
sys.modules.setdefault(f'{SCOPE}.registry', sys.modules[__name__])
for _name in ('RUNNER_CONSTRUCTORS', 'LOOPS', 'STRATEGIES', 'MODEL_WRAPPERS', 'WEIGHT_INITIALIZERS',
              'OPTIMIZERS', 'OPTIM_WRAPPER_CONSTRUCTORS', 'PARAM_SCHEDULERS', 'EVALUATOR',
              'TASK_UTILS', 'VISUALIZERS', 'VISBACKENDS', 'LOG_PROCESSORS', 'INFERENCERS'):
    if hasattr(mmreg, _name):
        _child(getattr(mmreg, _name))


def _memoize_config_pretty_text() -> None:
    """mmengine formats ``Config.pretty_text`` with yapf on every call (~0.4 s on a CPU), and a
    training run asks for it at least five times when it starts plus once per checkpoint: a
    few seconds per run, most of a short one's start-up. Memoise it on the config's content
    (``repr(cfg.to_dict())``): the same text, computed once."""
    from mmengine.config import Config
    original = Config.pretty_text
    if getattr(original.fget, '_gfl_memoized', False):
        return
    cache: OrderedDict = OrderedDict()

    def pretty_text(self) -> str:
        try:
            key = (repr(self.to_dict()), bool(getattr(self, '_format_python_code', True)))
        except Exception:  # noqa: BLE001 -- unusual content: no memo, mmengine's own path
            return original.fget(self)
        text = cache.get(key)
        if text is None:
            text = cache[key] = original.fget(self)
            if len(cache) > 16:
                cache.popitem(last=False)
        return text

    pretty_text._gfl_memoized = True  # type: ignore[attr-defined]
    Config.pretty_text = property(pretty_text, doc=original.__doc__)


_memoize_config_pretty_text()


# =============================================================================================
# model
# =============================================================================================
@MODELS.register_module(name='DetDataPreprocessor')
class GFLDataPreprocessor(BaseDataPreprocessor):
    """Moves a :func:`gfl_det.data.collate` batch to the model's device.

    The images stay uint8 (4x less to copy than float); :meth:`GFL.preprocess` normalises them on
    the device. Copies are ``non_blocking`` -- asynchronous when the DataLoader pins its memory,
    which :class:`GFLRunner` turns on whenever CUDA is present.

    Accepts MMDetection's ``DetDataPreprocessor`` keys: ``mean``/``std`` are read by the model
    (they are its normalisation), ``pad_size_divisor`` is checked against the batch (padding is
    done by the collate function, ``collate_fn=dict(type='gfl_collate', size_divisor=32)``),
    ``bgr_to_rgb`` must be True (our images are RGB from decoding on).

    Returns ``dict(inputs=uint8 (B, 3, Hb, Wb), data_samples=dict(gt_boxes, gt_labels, gt_valid,
    metas))`` -- the keyword arguments of :meth:`GFLDetector.forward`.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 bgr_to_rgb: bool = True, pad_size_divisor: int = 32, pad_value: float = 0,
                 non_blocking: bool = True, batch_augments: Any = None, **unused: Any):
        super().__init__(non_blocking=non_blocking)
        if not bgr_to_rgb:
            raise NotImplementedError('gfl_det feeds the network RGB images (mmdet bgr_to_rgb=True); '
                                      'BGR-input (caffe-style) models are not supported')
        if batch_augments or pad_value:
            raise NotImplementedError('DetDataPreprocessor batch_augments / pad_value are not '
                                      'supported by gfl_det')
        self.pad_size_divisor = int(pad_size_divisor)

    def forward(self, data: dict, training: bool = False) -> dict:
        inputs = data['inputs']
        d = self.pad_size_divisor
        if d > 1 and (inputs.shape[-1] % d or inputs.shape[-2] % d):
            raise ValueError(f'batch of shape {tuple(inputs.shape)} is not padded to a multiple of '
                             f'pad_size_divisor={d}; set the dataloader\'s collate_fn='
                             f"dict(type='gfl_collate', size_divisor={d})")
        dev, nb = self.device, self._non_blocking
        samples = {'metas': data['metas']}
        if training:
            for k in ('gt_boxes', 'gt_labels', 'gt_valid'):
                samples[k] = data[k].to(dev, non_blocking=nb)
        return {'inputs': inputs.to(dev, non_blocking=nb), 'data_samples': samples}


@MODELS.register_module(name='GFL')
class GFLDetector(GFL, BaseModel):
    """:class:`gfl_det.models.GFL` that mmengine's Runner can drive.

    It IS the detector (not a wrapper around one): ``state_dict()`` keys are exactly
    MMDetection's, so checkpoints go both ways without conversion. The data preprocessor holds
    no parameters or persistent buffers, so it adds no keys.

    Built from an MMDetection model dict (``type='GFL'`` plus backbone / neck / bbox_head /
    train_cfg / test_cfg / data_preprocessor) through :func:`gfl_det.models.build_detector`.
    """

    def __init__(self, backbone: dict, neck: dict, bbox_head: dict, train_cfg: dict | None = None,
                 test_cfg: dict | None = None, data_preprocessor: dict | None = None,
                 init_cfg: dict | None = None, class_names: Sequence[str] | None = None,
                 channels_last: bool = False):
        dp = dict(data_preprocessor or {})
        core = build_detector(dict(type='GFL', backbone=backbone, neck=neck, bbox_head=bbox_head,
                                   train_cfg=train_cfg, test_cfg=test_cfg, data_preprocessor=dp),
                              class_names=class_names)
        # GFL.__init__ -> super().__init__() is BaseModel.__init__ (MRO), which sets up BaseModule
        GFL.__init__(self, core.backbone, core.neck, core.bbox_head, core.train_cfg, core.test_cfg,
                     loss_weights=core.loss_weights, beta=core.beta,
                     octave_base_scale=core.octave_base_scale, class_names=core.class_names,
                     mean=core.pixel_mean.flatten().tolist(), std=core.pixel_std.flatten().tolist(),
                     channels_last=channels_last)
        dp.setdefault('type', 'DetDataPreprocessor')
        self.data_preprocessor = MODELS.build(dp)

    def parse_losses(self, losses: dict) -> tuple[Tensor, dict]:
        """mmengine's, also keeping the (detached) loss terms in ``last_loss_terms`` so that the
        non-finite guard of :class:`OptimWrapper` can name the bad term when a step fails
        (mmengine's DDP wrapper calls ``module.parse_losses`` too, so this works under DDP)."""
        loss, log_vars = super().parse_losses(losses)
        self.last_loss_terms = {k: v.detach() for k, v in log_vars.items()
                                if isinstance(v, Tensor) and k != 'loss'}
        return loss, log_vars

    def init_weights(self) -> None:
        """Nothing to do: every part is initialised (MMDetection's init) when it is built, and
        the backbone loads its ``init_cfg`` pretrained weights there. mmengine's default would
        call the backbone's own ``init_weights`` again and wipe pretrained weights."""

    def forward(self, inputs: Tensor, data_samples: dict | list | None = None,
                mode: str = 'tensor') -> Any:
        """``mode='loss'``: dict of losses; ``'predict'``: list over images of
        ``dict(bboxes (k, 4) xyxy in original-image pixels, scores, labels, img_id)``;
        ``'tensor'``: the head outputs ``(cls_scores, bbox_preds)``.

        ``data_samples`` is what :class:`GFLDataPreprocessor` returns (``metas`` plus the padded
        ground truth), or simply the list of metas. In ``'tensor'`` mode uint8 inputs are
        normalised first; floating inputs are taken as already normalised (the output of
        :meth:`GFL.preprocess`) -- that is how :meth:`GFL.loss` calls ``self(x)``.
        """
        if isinstance(data_samples, dict):
            metas = data_samples['metas']
        else:
            metas = data_samples
        if mode == 'tensor':
            x = inputs if inputs.is_floating_point() else self.preprocess(
                inputs, metas or [{'img_shape': tuple(inputs.shape[-2:])}] * len(inputs))
            return GFL.forward(self, x)
        if metas is None:
            raise ValueError(f"GFLDetector.forward(mode='{mode}') needs the batch metas")
        x = self.preprocess(inputs, metas)
        if mode == 'loss':
            return self.loss(x, data_samples['gt_boxes'], data_samples['gt_labels'],
                             data_samples['gt_valid'], metas)
        if mode == 'predict':
            preds = self.predict(x, metas, rescale=True)
            for p, m in zip(preds, metas):
                p['img_id'] = m['img_id']
                if m.get('load_failed'):  # the dataset's stand-in for an unreadable image
                    for k in ('bboxes', 'scores', 'labels'):
                        p[k] = p[k][:0]
                    p['load_failed'] = m['load_failed']
                    p['file_name'] = m.get('file_name')
            return preds
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")


# =============================================================================================
# data
# =============================================================================================
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


@DATA_SAMPLERS.register_module(name='AspectRatioBatchSampler')
class AspectRatioBatchSampler(gdata.AspectRatioBatchSampler):
    """:class:`gfl_det.data.AspectRatioBatchSampler` with MMDetection's end-of-epoch rule: the
    two orientation buckets' remainders are put together and cut into batches (one of them
    may then mix orientations).

    Why: every rank of a distributed run must make the same number of steps per epoch (DDP's
    all-reduce otherwise waits forever at the end of the epoch). Emitting each bucket's
    remainder separately makes the count depend on the orientation mix of each rank's share;
    merging makes it exactly ``ceil(n / batch_size)`` (``floor`` with ``drop_last``) on every
    rank, and ``len()`` exact.
    """

    def __iter__(self):
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

    ``synthetic=dict(num_train=300, num_val=60, seed=0)`` are the generator's arguments.
    """

    def __init__(self, data_root: str = 'data/synthetic/', synthetic: dict | None = None,
                 **kwargs: Any):
        if get_rank() == 0:
            gdata.make_synthetic_coco(data_root, **(synthetic or {}))
        barrier()
        super().__init__(data_root=data_root, **kwargs)


# =============================================================================================
# evaluation
# =============================================================================================
@METRICS.register_module(name='CocoMetric')
class CocoMetric(BaseMetric):
    """COCO bbox mAP through pycocotools (:class:`gfl_det.evaluation.CocoEvaluator`).

    Logs COCOeval's 12 numbers and a per-class AP table; returns all 12 under MMDetection's names
    with the ``coco/`` prefix (``coco/bbox_mAP``, ``coco/bbox_mAP_50``, ...) so that
    ``CheckpointHook(save_best='coco/bbox_mAP')`` works.

    Images that failed to load (the dataset's ``on_bad_image='skip'`` stand-ins, flagged
    ``load_failed``) are not scored: they are listed in a warning and counted as
    ``coco/failed_images`` (a 13th key, present only when some failed); the metrics are those
    of the images that loaded. A model that outputs no detections at all gets AP 0.

    Args:
        ann_file: the COCO annotation JSON of the evaluated split.
        metric: ``'bbox'`` (the only one).
        classwise: per-class AP table (default True; mmdet's default is False).
        format_only: only write the results file, do not evaluate.
        outfile: write the detections as a COCO results JSON to this path.
        outfile_prefix: mmdet's spelling: write ``{outfile_prefix}.bbox.json``.
    """

    default_prefix = 'coco'

    def __init__(self, ann_file: str, metric: Union[str, Sequence[str]] = 'bbox',
                 classwise: bool = True, format_only: bool = False, outfile: str | None = None,
                 outfile_prefix: str | None = None, collect_device: str = 'cpu',
                 prefix: str | None = None, backend_args: Any = None, **unused: Any):
        super().__init__(collect_device=collect_device, prefix=prefix)
        metrics = [metric] if isinstance(metric, str) else list(metric)
        if metrics != ['bbox']:
            raise NotImplementedError(f"CocoMetric supports metric='bbox' only, got {metric!r}")
        self.ann_file = ann_file
        self.classwise = classwise
        self.format_only = format_only
        self.outfile = outfile or (f'{outfile_prefix}.bbox.json' if outfile_prefix else None)
        if format_only and not self.outfile:
            raise ValueError('CocoMetric(format_only=True) needs outfile (or outfile_prefix)')

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for p in data_samples:
            r = {'img_id': int(p['img_id']),
                 'bboxes': p['bboxes'].detach().cpu().numpy(),
                 'scores': p['scores'].detach().cpu().numpy(),
                 'labels': p['labels'].detach().cpu().numpy()}
            if p.get('load_failed'):  # counted and reported, not scored
                r.update(load_failed=str(p['load_failed']), file_name=str(p.get('file_name')))
            self.results.append(r)

    def compute_metrics(self, results: list) -> dict:
        logger = MMLogger.get_current_instance()
        cat_ids = (self.dataset_meta or {}).get('cat_ids')
        ev = CocoEvaluator(self.ann_file, cat_ids=cat_ids, classwise=self.classwise,
                           logger=logger)
        ev.process(results, [{k: r[k] for k in ('img_id', 'load_failed', 'file_name') if k in r}
                             for r in results])
        if self.outfile:
            d = osp.dirname(osp.abspath(self.outfile))
            os.makedirs(d, exist_ok=True)
            ev.dump(self.outfile)
            logger.info(f'wrote {len(ev.results)} detections (COCO results format) to {self.outfile}')
        if self.format_only:
            return {}
        res = ev.evaluate()
        self.last_evaluator = ev  # tools/test.py --plot-dir: PR curves and confusion matrix
        metrics = {name: float(res[name]) for name in METRIC_NAMES}
        if res['failed_images']:  # only then, so that a clean run has MMDetection's 12 keys
            metrics['failed_images'] = float(len(res['failed_images']))
        return metrics


# =============================================================================================
# optimisation and logging without per-iteration host syncs
# =============================================================================================
class _DeferredScalars:
    """Mixin for OptimWrapper: keep the gradient norm on the device (mmengine calls
    ``float(grad_norm)`` every iteration, a host sync) until :class:`DeferredRuntimeInfoHook`
    collects it; without that hook it logs immediately, as mmengine does."""

    defer_scalars = False

    def _clip_grad(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g['params']
                  if p.requires_grad and p.grad is not None]
        if not params:
            return
        grad = self.clip_func(params, **self.clip_grad_kwargs)
        if grad is None:  # clip_grad_value_
            return
        if self.defer_scalars:
            self.pending_scalars = getattr(self, 'pending_scalars', {})
            self.pending_scalars[self.grad_name] = grad.detach()
        else:
            self.message_hub.update_scalar(f'train/{self.grad_name}', float(grad))

    def pop_pending_scalars(self) -> dict:
        out, self.pending_scalars = getattr(self, 'pending_scalars', {}), {}
        return out


_DEFAULT_GUARD = dict(max_consecutive=5)


@OPTIM_WRAPPERS.register_module(name='OptimWrapper')
class OptimWrapper(_DeferredScalars, _MMOptimWrapper):
    """mmengine's ``OptimWrapper`` (grad clipping, accumulation) with the deferred grad norm and
    a guard against non-finite steps.

    ``optim_wrapper = dict(type='OptimWrapper', optimizer=..., nonfinite_guard=dict(
    max_consecutive=5))`` (the default; ``nonfinite_guard=None`` turns it off). After backward
    the total loss and every gradient are reduced on the device to one flag, read once per
    iteration (one host sync; all-reduced across ranks so that every rank decides alike). A
    non-finite step is *skipped*: no optimizer step, gradients zeroed, and the model's buffers
    (BatchNorm running statistics, which the forward pass already updated, possibly with NaN)
    put back as they were before the forward pass -- so the model is exactly as before the step.
    It is counted (``train/nonfinite_skipped`` in the MessageHub and the log, from the first
    skip on; the count is saved in checkpoints with the optimizer state) and logged with the
    iteration (1-based, as mmengine's logs) and the loss term(s) that are non-finite, or the
    parameters whose gradient is. :class:`DeferredRuntimeInfoHook` leaves a skipped step's
    losses out of the logged (smoothed) values, so one NaN does not turn the next 50 log lines
    into NaN. ``max_consecutive`` skipped steps in a row raise
    :class:`gfl_det.guard.NonFiniteLossError` (:class:`GFLRunner` adds the last good checkpoint
    to the message; nothing is saved from the broken state). The lr schedule moves on through a
    skipped iteration, as it does for any iteration.

    With gradient accumulation (``accumulative_counts > 1``) a bad micro-batch also discards the
    gradients accumulated before it in its window. For mixed precision see
    :class:`AmpOptimWrapper`.
    """

    _guard_grads = True  # AmpOptimWrapper: False when its GradScaler checks the gradients
    step_skipped = False  # the last update_params was skipped by the guard

    def __init__(self, *args: Any, nonfinite_guard: Union[dict, bool, None] = _DEFAULT_GUARD,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if nonfinite_guard is None or nonfinite_guard is False:
            self.guard: Optional[NonFiniteGuard] = None
        else:
            cfg = {} if nonfinite_guard is True else dict(nonfinite_guard)
            cfg.pop('type', None)
            self.guard = NonFiniteGuard(logger=MMLogger.get_current_instance(), **cfg)
        self._guard_model: Optional[torch.nn.Module] = None
        self._guard_bufs: list = []
        self._guard_backup: list = []

    # ------------------------------------------------------------------ non-finite guard
    @contextlib.contextmanager
    def optim_context(self, model: torch.nn.Module):
        if self.guard is not None:
            self._guard_snapshot(model)
        with super().optim_context(model):
            yield

    def _guard_snapshot(self, model: torch.nn.Module) -> None:
        """Remember the model (to name loss terms / parameters) and copy its buffers, which the
        coming forward pass changes (BatchNorm running stats), into a reused backup."""
        m = model.module if is_model_wrapper(model) else model
        self._guard_model = m
        bufs = list(m.buffers())
        with torch.no_grad():
            if (len(bufs) != len(self._guard_bufs)
                    or any(a is not b for a, b in zip(bufs, self._guard_bufs))):
                self._guard_bufs = bufs
                self._guard_backup = [b.detach().clone() for b in bufs]
            elif bufs:
                torch._foreach_copy_(self._guard_backup, bufs)

    def _step_nonfinite(self, loss: Tensor) -> bool:
        grads = ([p.grad for g in self.optimizer.param_groups for p in g['params']
                  if p.grad is not None] if self._guard_grads else [])
        flag = NonFiniteGuard.nonfinite(loss, grads)
        import torch.distributed as tdist
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            flag = flag.to(torch.int32)
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag)  # the one host sync

    def _skip_step(self, zero_kwargs: dict) -> None:
        m = self._guard_model
        if m is not None:
            named = list(m.named_parameters())
            terms = getattr(m, 'last_loss_terms', None)
        else:
            named = [(f'param_groups[{i}][{j}]', p) for i, g in enumerate(self.optimizer.param_groups)
                     for j, p in enumerate(g['params'])]
            terms = None
        reason = NonFiniteGuard.describe(terms, named)
        self.zero_grad(**zero_kwargs)
        if m is not None and self._guard_bufs:
            with torch.no_grad():
                torch._foreach_copy_(self._guard_bufs, self._guard_backup)
        it = self.message_hub.get_info('iter')
        try:
            self.guard.skip(None if it is None else int(it) + 1, reason)
        finally:
            self.message_hub.update_scalar('train/nonfinite_skipped', self.guard.skipped)

    def update_params(self, loss: Tensor, step_kwargs: Optional[dict] = None,
                      zero_kwargs: Optional[dict] = None) -> None:
        if self.guard is None:
            return super().update_params(loss, step_kwargs, zero_kwargs)
        loss = self.scale_loss(loss)
        self.backward(loss)
        self.step_skipped = self._step_nonfinite(loss)
        if self.step_skipped:
            self._skip_step(zero_kwargs or {})
            return
        self.guard.passed()
        if self.should_update():
            self.step(**(step_kwargs or {}))
            self.zero_grad(**(zero_kwargs or {}))

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.guard is not None:
            state['nonfinite_guard'] = self.guard.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        guard = state_dict.pop('nonfinite_guard', None)
        if guard and self.guard is not None:
            self.guard.load_state_dict(guard)
        super().load_state_dict(state_dict)


@OPTIM_WRAPPERS.register_module(name='AmpOptimWrapper')
class AmpOptimWrapper(OptimWrapper):
    """Mixed precision that also runs on the CPU (mmengine's refuses to be built without a GPU).

    Non-finite steps: with float16 the GradScaler owns the gradient check -- a step whose
    (scaled) gradients overflow is skipped by ``GradScaler.step`` and the scale is lowered, the
    normal dynamic loss-scaling mechanism; the guard of :class:`OptimWrapper` does not count
    those (no double counting, no stop) and checks only the loss itself (a NaN/Inf loss is not
    a scaling problem: it is skipped and counted as without AMP, and the scaler is left as it
    was). With bfloat16 (no loss scaling) the guard checks loss and gradients as without AMP.
    The scaler's state (scale, growth tracker) is saved in checkpoints and restored on resume.

    Args:
        dtype: ``'float16'``, ``'bfloat16'`` or None/``'auto'``: float16 on CUDA, bfloat16 on the
            CPU (the CPU autocast type).
        loss_scale: ``'dynamic'``, a float (static scale) or GradScaler kwargs; used only with
            float16 (bfloat16 has float32's range and needs no loss scaling).
    """

    def __init__(self, dtype: Union[str, torch.dtype, None] = None,
                 loss_scale: Union[str, float, dict] = 'dynamic', **kwargs: Any):
        super().__init__(**kwargs)
        self.device_type = 'cuda' if torch.cuda.is_available() else 'cpu'
        if dtype in (None, 'auto'):
            dtype = torch.float16 if self.device_type == 'cuda' else torch.bfloat16
        elif isinstance(dtype, str):
            if dtype not in ('float16', 'bfloat16'):
                raise ValueError(f"AmpOptimWrapper dtype must be 'float16' or 'bfloat16', got {dtype!r}")
            dtype = getattr(torch, dtype)
        self.cast_dtype = dtype
        self._scale_update_param = None
        scaler_kwargs: dict = {}
        if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
            self._scale_update_param = float(loss_scale)
            scaler_kwargs = dict(init_scale=float(loss_scale))
        elif isinstance(loss_scale, dict):
            scaler_kwargs = dict(loss_scale)
        elif loss_scale != 'dynamic':
            raise TypeError(f"loss_scale must be 'dynamic', a float or a dict, got {loss_scale!r}")
        self.loss_scaler = torch.amp.GradScaler(self.device_type,
                                                enabled=dtype == torch.float16, **scaler_kwargs)
        self._guard_grads = not self.loss_scaler.is_enabled()

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        self.loss_scaler.scale(loss).backward(**kwargs)
        self._inner_count += 1

    def step(self, **kwargs: Any) -> None:
        if self.clip_grad_kwargs:
            self.loss_scaler.unscale_(self.optimizer)
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update(self._scale_update_param)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state['loss_scaler'] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        scaler = state_dict.pop('loss_scaler', None)
        if scaler:
            self.loss_scaler.load_state_dict(scaler)
        super().load_state_dict(state_dict)

    @contextlib.contextmanager
    def optim_context(self, model: torch.nn.Module):
        with super().optim_context(model), \
                torch.autocast(device_type=self.device_type, dtype=self.cast_dtype):
            yield


@HOOKS.register_module()
class DeferredRuntimeInfoHook(RuntimeInfoHook):
    """mmengine's ``RuntimeInfoHook`` (epoch/iter/lr/metrics into the MessageHub) that keeps the
    per-iteration losses (and the grad norm) on the device and hands them to the MessageHub in
    ONE host sync per logging interval, just before the LoggerHook reads them.

    The MessageHub ends up holding exactly what mmengine's hook would have put there (one value
    per iteration), so the smoothed log lines are the same; mmengine's hook calls ``.item()`` on
    every loss every iteration, which stalls the GPU queue.
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        super().before_train(runner)
        self._pending: list[dict] = []
        loggers = [h for h in runner.hooks if isinstance(h, LoggerHook)]
        self._interval = loggers[0].interval if loggers else 1
        ow = runner.optim_wrapper
        if isinstance(ow, _DeferredScalars):
            ow.defer_scalars = True

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        if getattr(runner.optim_wrapper, 'step_skipped', False):
            outputs = None  # non-finite losses of a skipped step: counted and logged by the guard
        vals = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in (outputs or {}).items()}
        if isinstance(runner.optim_wrapper, _DeferredScalars):
            vals.update(runner.optim_wrapper.pop_pending_scalars())
        self._pending.append(vals)
        if (self.every_n_inner_iters(batch_idx, self._interval)
                or self.every_n_train_iters(runner, self._interval)
                or self.end_of_epoch(runner.train_dataloader, batch_idx)
                or runner.iter + 1 >= runner.max_iters):
            self.flush(runner)

    def flush(self, runner) -> None:
        """Write the pending values to the MessageHub (one device->host copy for all)."""
        pending, self._pending = getattr(self, '_pending', []), []
        if not pending:
            return
        tensors = [v for d in pending for v in d.values() if isinstance(v, Tensor)]
        host = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist()) if tensors else None
        for d in pending:
            for k, v in d.items():
                runner.message_hub.update_scalar(f'train/{k}', next(host) if isinstance(v, Tensor) else v)

    def before_val(self, runner) -> None:
        self.flush(runner)
        super().before_val(runner)

    def after_train(self, runner) -> None:
        self.flush(runner)
        super().after_train(runner)


# =============================================================================================
# drawing predictions (tools/test.py --show-dir)
# =============================================================================================
@HOOKS.register_module()
class DrawPredictionsHook(Hook):
    """Writes each test image with its predicted boxes, class names and scores to ``out_dir``
    (same file name as the image)."""

    def __init__(self, out_dir: str, score_thr: float = 0.3):
        self.out_dir = out_dir
        self.score_thr = score_thr

    def after_test_iter(self, runner, batch_idx: int, data_batch: Any = None,
                        outputs: Optional[Sequence[dict]] = None) -> None:
        import cv2

        from .visualize import draw_detections
        dataset = runner.test_dataloader.dataset
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        names = getattr(model, 'class_names', None) or getattr(dataset, 'classes', None)
        os.makedirs(self.out_dir, exist_ok=True)
        for pred, meta in zip(outputs or [], data_batch['metas']):
            if meta.get('load_failed'):
                continue
            img = gdata.load_image(osp.join(dataset.img_dir, meta['file_name']))
            drawn = draw_detections(img, pred, names, self.score_thr)
            cv2.imwrite(osp.join(self.out_dir, osp.basename(meta['file_name'])),
                        cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))


# =============================================================================================
# reliability: randomness kept out of validation, a report of bad input
# =============================================================================================
@HOOKS.register_module()
class ValRandomStateHook(Hook):
    """Validation leaves the random number generators as it found them (states saved in
    ``before_val``, put back in ``after_val``).

    Why: a checkpoint is written at the end of an epoch, *before* that epoch's validation, and
    holds the generators' states (:meth:`GFLRunner.save_checkpoint`); the resumed run goes
    straight on with training. Validation draws from torch's generator (every DataLoader
    iterator draws a base seed), so without this the uninterrupted run and the resumed one
    would train on differently seeded data. As a bonus, ``val_interval`` no longer changes the
    training trajectory. :class:`GFLRunner` registers it itself.
    """

    priority = 'VERY_HIGH'

    def before_val(self, runner) -> None:
        self._state = capture_rng_state()

    def after_val(self, runner) -> None:
        state = getattr(self, '_state', None)
        if state is not None:
            restore_rng_state(state)
            self._state = None


@HOOKS.register_module()
class DataReportHook(Hook):
    """Reports bad input in the run's log (and so in the log file), with counts and file names.

    * before training / validation / testing: what the dataset skipped or repaired when it was
      loaded (:class:`gfl_det.data.SkipReport`: missing files, bad boxes, unknown ids, ...);
    * during training: images that failed to decode (or disagreed with the JSON) and were
      replaced by another image -- collected from the batch metas, so those found in DataLoader
      worker processes count too -- one warning line per iteration that had any;
    * after training: the whole training report (load time + this run's replacements).

    Images that fail in evaluation are counted by :class:`CocoMetric`. :class:`GFLRunner`
    registers this hook itself.
    """

    priority = 'BELOW_NORMAL'

    def __init__(self) -> None:
        self.runtime = gdata.SkipReport()
        self._load_report = gdata.SkipReport()
        self._reported: set = set()

    def _report_dataset(self, runner, loader: Any, what: str) -> None:
        ds = getattr(loader, 'dataset', None)
        rep = getattr(ds, 'skipped', None)
        if not isinstance(rep, gdata.SkipReport) or id(ds) in self._reported:
            return
        self._reported.add(id(ds))
        if rep.total:
            runner.logger.warning(f'{what} data {getattr(ds, "ann_file", "")}: {len(ds)} images in '
                                  f'use; found at load (skipped, or repaired as noted):\n{rep}')

    def before_train(self, runner) -> None:
        loader = runner.train_dataloader
        self._report_dataset(runner, loader, 'training')
        rep = getattr(getattr(loader, 'dataset', None), 'skipped', None)
        self._load_report = gdata.SkipReport().merge(rep) if isinstance(rep, gdata.SkipReport) \
            else gdata.SkipReport()

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        metas = data_batch.get('metas') if isinstance(data_batch, dict) else None
        if not metas or not any('skipped' in m for m in metas):
            return
        new = gdata.SkipReport().add_from_metas(metas)
        self.runtime.merge(new)
        runner.logger.warning(
            f'iteration {runner.iter + 1}: {new.total} bad image(s) replaced by other images in '
            'this batch: ' + '; '.join(f'{r} {", ".join(new.files(r))}' for r in sorted(new.counts))
            + f' ({self.runtime.total} replaced in this run so far)')

    def after_train(self, runner) -> None:
        total = gdata.SkipReport().merge(self._load_report).merge(self.runtime)
        if total.total:
            runner.logger.warning('training data report (skipped at load, and bad images '
                                  f'replaced during this run):\n{total}')
        else:
            runner.logger.info('training data report: no problems')

    def before_val(self, runner) -> None:
        self._report_dataset(runner, runner.val_dataloader, 'validation')

    def before_test(self, runner) -> None:
        self._report_dataset(runner, runner.test_dataloader, 'test')


# =============================================================================================
# checkpoints: plain data in, atomic writes, explicit trust
# =============================================================================================
_HB = '__history_buffer__'


def encode_message_hub(state: dict) -> dict:
    """mmengine ``MessageHub.state_dict()`` -> plain data that ``weights_only=True`` loads:
    each ``HistoryBuffer`` becomes ``{'__history_buffer__': True, 'log_history': [...],
    'count_history': [...], 'max_length': n}``; numpy values become Python numbers / lists."""
    def plain(x: Any) -> Any:
        if isinstance(x, HistoryBuffer):
            log, count = x.data
            return {_HB: True, 'log_history': np.asarray(log, np.float64).tolist(),
                    'count_history': np.asarray(count, np.float64).tolist(),
                    'max_length': int(x.max_length)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(plain(v) for v in x)
        return x
    return plain(state)


def decode_message_hub(state: dict) -> dict:
    """Inverse of :func:`encode_message_hub` (a plain mmengine state dict passes unchanged)."""
    def back(x: Any) -> Any:
        if isinstance(x, dict) and x.get(_HB):
            return HistoryBuffer(x['log_history'], x['count_history'], x['max_length'])
        if isinstance(x, dict):
            return OrderedDict((k, back(v)) for k, v in x.items())
        return x
    out = dict(state)
    out['log_scalars'] = back(state.get('log_scalars', {}))
    return out


def _local_checkpoint(filename: str) -> str:
    """A local path for ``filename``; http(s) URLs are downloaded to torch's hub cache first."""
    if filename.startswith(('http://', 'https://')):
        from urllib.parse import urlparse
        dst = osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(urlparse(filename).path))
        if not osp.isfile(dst):
            os.makedirs(osp.dirname(dst), exist_ok=True)
            torch.hub.download_url_to_file(filename, dst)
        return dst
    if '://' in filename:
        raise ValueError(f'cannot load {filename!r}: give a local file or an http(s) URL')
    return filename


@RUNNERS.register_module()
class GFLRunner(Runner):
    """mmengine's Runner with gfl_det's checkpoint policy (see the module docstring) and data
    loader defaults (``pin_memory`` when CUDA is present)."""

    _trusted_load = False
    _resumed_rng: Optional[dict] = None

    # ------------------------------------------------------------------ hooks, train
    def register_hooks(self, default_hooks: Optional[dict] = None,
                       custom_hooks: Optional[list] = None) -> None:
        """mmengine's, plus :class:`ValRandomStateHook` and :class:`DataReportHook` unless the
        config already has them."""
        super().register_hooks(default_hooks, custom_hooks)
        for cls in (ValRandomStateHook, DataReportHook):
            if not any(isinstance(h, cls) for h in self._hooks):
                self.register_hook(cls())

    def train(self) -> torch.nn.Module:
        """mmengine's; a :class:`NonFiniteLossError` (too many non-finite steps in a row, or
        non-finite weights at a checkpoint) gets the last good checkpoint added to its message
        and is logged before it propagates. Nothing is saved from the broken state."""
        try:
            return super().train()
        except NonFiniteLossError as e:
            ckpt = find_latest_checkpoint(self.work_dir, logger=self.logger)
            if ckpt is None:
                where = 'No checkpoint had been written yet.'
            else:
                try:
                    meta = torch.load(ckpt, map_location='cpu', weights_only=False,
                                      mmap=True).get('meta', {})
                    at = f" (epoch {meta.get('epoch')}, iteration {meta.get('iter')})"
                except Exception:  # noqa: BLE001 -- the name is what matters
                    at = ''
                where = (f'The last good checkpoint is {ckpt}{at}; continue from it with '
                         '`tools/train.py CONFIG --resume` once the cause is fixed.')
            e.args = (f'{e.args[0] if e.args else e} {where} No checkpoint was written from '
                      'the broken state.',) + tuple(e.args[1:])
            self.logger.error(e.args[0])
            raise

    # ------------------------------------------------------------------ logger
    def build_logger(self, log_level: Union[int, str] = 'INFO', log_file: Optional[str] = None,
                     **kwargs: Any) -> MMLogger:
        """mmengine's, with a name of its own: mmengine names the logger and the MessageHub
        after the config file and the second the run started, and ``get_instance`` hands back
        an existing instance of that name -- so a second run of the same config started in the
        same second of the same process (``tools/test.py`` after ``tools/train.py`` in a
        notebook) would write into the first run's log file and share its MessageHub. A suffix
        (``_2``, ``_3``, ...) keeps them apart."""
        if 'name' not in kwargs and MMLogger.check_instance_created(self._experiment_name):
            base, i = self._experiment_name, 2
            while (MMLogger.check_instance_created(f'{base}_{i}')
                   or MessageHub.check_instance_created(f'{base}_{i}')):
                i += 1
            self._experiment_name = f'{base}_{i}'
        return super().build_logger(log_level=log_level, log_file=log_file, **kwargs)

    # ------------------------------------------------------------------ CPU multi-process
    def setup_env(self, env_cfg: dict) -> None:
        """mmengine's pytorch launcher calls ``torch.cuda.set_device``; without CUDA we start the
        process group ourselves (gloo), so that torchrun also works on CPU-only machines."""
        import torch.distributed as tdist
        if (self.distributed and self.launcher == 'pytorch' and not torch.cuda.is_available()
                and not tdist.is_initialized()):
            tdist.init_process_group(backend='gloo')
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg: Optional[dict], model: torch.nn.Module) -> Any:
        if self.distributed and not torch.cuda.is_available() and model_wrapper_cfg is None:
            # DDP over CPU processes takes no device_ids (mmengine passes LOCAL_RANK)
            model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None)
        return super().wrap_model(model_wrapper_cfg, model)

    # ------------------------------------------------------------------ data
    @staticmethod
    def build_dataloader(dataloader: Any, seed: Optional[int] = None,
                         diff_rank_seed: bool = False) -> Any:
        if isinstance(dataloader, dict):
            dataloader = copy.deepcopy(dataloader)
            if 'pin_memory' not in dataloader:
                dataloader['pin_memory'] = torch.cuda.is_available()
            if not dataloader.get('num_workers', 0):
                dataloader.pop('persistent_workers', None)  # DataLoader refuses it without workers
            collate = dataloader.get('collate_fn')
            if isinstance(collate, dict) and isinstance(collate.get('type'), str):
                # mmengine looks collate functions up in its root registry only
                fn = FUNCTIONS.get(collate['type'])
                if fn is not None:
                    dataloader['collate_fn'] = dict(collate, type=fn)
        return Runner.build_dataloader(dataloader, seed=seed, diff_rank_seed=diff_rank_seed)

    # ------------------------------------------------------------------ save
    @master_only
    def save_checkpoint(self, out_dir: str, filename: str, file_client_args: Optional[dict] = None,
                        save_optimizer: bool = True, save_param_scheduler: bool = True,
                        meta: Optional[dict] = None, by_epoch: bool = True,
                        backend_args: Optional[dict] = None) -> None:
        """mmengine's checkpoint contents, written atomically and as plain data only (so it also
        loads with ``weights_only=True``); local files only."""
        if file_client_args or backend_args or '://' in str(out_dir):
            raise NotImplementedError('gfl_det writes checkpoints to local files only')
        meta = dict(meta or {})
        if by_epoch:  # called from after_train_epoch, before the epoch counter moves on
            meta.setdefault('epoch', self.epoch + 1)
            meta.setdefault('iter', self.iter)
        else:
            meta.setdefault('epoch', self.epoch)
            meta.setdefault('iter', self.iter + 1)
        meta.update(cfg=self.cfg.pretty_text, seed=self.seed, experiment_name=self.experiment_name,
                    time=time.strftime('%Y%m%d_%H%M%S', time.localtime()),
                    mmengine_version=mmengine.__version__)
        dataset_meta = getattr(self.train_dataloader.dataset, 'metainfo', None)
        if dataset_meta is not None:
            meta['dataset_meta'] = copy.deepcopy(dict(dataset_meta))
        model = self.model.module if is_model_wrapper(self.model) else self.model
        state_dict = model.state_dict()
        if bool(NonFiniteGuard.nonfinite(grads=[v for v in state_dict.values()
                                                if v.is_floating_point()])):
            bad = [k for k, v in state_dict.items()
                   if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            raise NonFiniteLossError(
                f'iteration {self.iter}: the model\'s weights are not finite ({len(bad)} '
                f'tensor(s), e.g. {", ".join(bad[:3])}); {filename} was NOT written. Training '
                'stopped; lower the learning rate or enable gradient clipping.')
        to_cpu = lambda x: apply_to(x, lambda v: hasattr(v, 'cpu'), lambda v: v.cpu())  # noqa: E731
        checkpoint = {'meta': meta, 'state_dict': weights_to_cpu(state_dict),
                      'message_hub': to_cpu(encode_message_hub(self.message_hub.state_dict())),
                      # for an exact resume (restored by resume(); plain tensors and numbers)
                      'rng_state': capture_rng_state()}
        if save_optimizer:
            checkpoint['optimizer'] = to_cpu(self.optim_wrapper.state_dict())
        if save_param_scheduler and self.param_schedulers is not None:
            if isinstance(self.param_schedulers, dict):
                checkpoint['param_schedulers'] = {
                    k: [s.state_dict() for s in v] for k, v in self.param_schedulers.items()}
            else:
                checkpoint['param_schedulers'] = [s.state_dict() for s in self.param_schedulers]
        self.call_hook('before_save_checkpoint', checkpoint=checkpoint)
        atomic_save(checkpoint, osp.join(out_dir, filename))

    # ------------------------------------------------------------------ load
    def load_checkpoint(self, filename: str, map_location: Any = 'cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]) -> dict:  # noqa: B006 (mmengine's)
        """Weights into the model. Untrusted (``weights_only=True``) unless called by
        :meth:`resume` or the config says ``load_from_trusted = True``. Non-strict for
        ``load_from`` (fine-tuning: keys that do not fit are reported and skipped) unless the
        config says ``load_from_strict = True`` (tools/test.py); strict for resume. Sets
        ``model.class_names`` from the checkpoint's meta."""
        path = _local_checkpoint(str(filename))
        # resume, or the user vouched for load_from (tools/test.py --trust-checkpoint)
        trusted = self._trusted_load or bool(self.cfg.get('load_from_trusted', False))
        checkpoint = (load_trusted if trusted else load_untrusted)(path, map_location=map_location)
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get('message_hub'), dict):
            checkpoint['message_hub'] = decode_message_hub(checkpoint['message_hub'])
        if self._trusted_load and isinstance(checkpoint, dict):  # resume: see resume()
            self._resumed_rng = checkpoint.get('rng_state')
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        strict = strict or self._trusted_load or bool(self.cfg.get('load_from_strict', False))
        meta = load_weights(model, checkpoint, strict=strict, logger=self.logger)
        if meta.get('classes') and hasattr(model, 'class_names'):
            model.class_names = tuple(meta['classes'])
            self._check_classes(model.class_names)
        self._has_loaded = True
        self.logger.info(f'Loaded {"trusted (resume)" if trusted else "weights-only"} checkpoint '
                         f'{filename}')
        return checkpoint

    def _check_classes(self, classes: tuple) -> None:
        """Warn when the checkpoint's class names differ from the dataset's (labels would be
        mapped to the wrong categories)."""
        for loop in (self._test_loop, self._val_loop, self._train_loop):
            dataset = getattr(getattr(loop, 'dataloader', None), 'dataset', None)
            names = getattr(dataset, 'classes', None)
            if names is not None:
                if tuple(names) != tuple(classes):
                    self.logger.warning(f'the checkpoint\'s classes {tuple(classes)} differ from the '
                                        f'dataset\'s {tuple(names)}: label i is evaluated as the '
                                        f'dataset\'s class i')
                return

    def resume(self, filename: str, resume_optimizer: bool = True,
               resume_param_scheduler: bool = True, map_location: Any = 'default') -> None:
        """mmengine's resume, reading the file as TRUSTED (our own work_dir checkpoint), then
        putting back the random generators' states saved with it (python, numpy, torch, CUDA;
        mmengine only re-seeds them, so data augmentation after a resume would differ from an
        uninterrupted run). The AMP GradScaler state comes back with the optimizer state
        (:class:`AmpOptimWrapper`), the non-finite skip count too (:class:`OptimWrapper`).

        Not restored: in a distributed run with ``randomness.diff_rank_seed=True`` (each rank
        had its own states; the checkpoint holds rank 0's), and the states inside DataLoader
        worker processes -- with ``persistent_workers=True`` those run on from one epoch to the
        next and restart from their seed after a resume. Bit-exact resume therefore needs
        ``num_workers=0`` or ``persistent_workers=False`` (mmengine seeds the workers of every
        epoch alike), a deterministic run on the same hardware, and a resume from an epoch
        checkpoint (mmengine's EpochBasedTrainLoop restarts a resumed epoch from its first
        batch).
        """
        self._trusted_load = True
        self._resumed_rng = None
        try:
            super().resume(filename, resume_optimizer, resume_param_scheduler, map_location)
        finally:
            self._trusted_load = False
        rng, self._resumed_rng = self._resumed_rng, None
        if rng and not (self.distributed and self._randomness_cfg.get('diff_rank_seed')):
            done = restore_rng_state(rng)
            self.logger.info(f'restored the random generator states ({", ".join(done)}) from '
                             f'{filename}')

    def load_or_resume(self) -> None:
        """``resume=True`` without ``load_from``: the newest complete checkpoint in the work_dir
        (:func:`gfl_det.checkpoint.find_latest_checkpoint` skips truncated files; the temp files
        of saves interrupted by a kill are deleted first); none found: start from scratch,
        saying so."""
        if self._has_loaded:
            return
        resume_from = None
        if self._resume and self._load_from is None:
            if self.rank == 0:  # nothing is saving now: drop what killed saves left behind
                remove_partial_saves(self.work_dir, logger=self.logger)
            resume_from = find_latest_checkpoint(self.work_dir, logger=self.logger)
            if resume_from is None:
                self.logger.warning(f'resume: no checkpoint in {self.work_dir}; training from '
                                    'the start')
            else:
                self.logger.info(f'Auto-resuming from the latest checkpoint {resume_from}')
        elif self._resume:
            resume_from = self._load_from
        if resume_from is not None:
            self.resume(resume_from)
        elif self._load_from is not None:
            self.load_checkpoint(self._load_from)
        self._has_loaded = True


def register_all_modules() -> None:
    """Importing :mod:`gfl_det.mm` registers everything; this exists for symmetry with mmdet's
    ``register_all_modules`` and sets the default scope when none is set."""
    from mmengine.registry import DefaultScope
    if DefaultScope.get_current_instance() is None:
        DefaultScope.get_instance(f'gfl_det-{time.time()}', scope_name=SCOPE)

