"""The adapter between gfl_det and mmengine: the framework edge.

Everything mmengine-specific lives in this package; ``gfl_det.models``, ``gfl_det.criterion``,
``gfl_det.data`` and ``gfl_det.evaluation`` stay plain PyTorch / numpy. Importing it (configs
say ``custom_imports = dict(imports=['gfl_det.mm'])``) registers, in registries of our own scope
``'gfl_det'`` (``default_scope = 'gfl_det'``), the pieces an MMDetection-style config names:

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
``'AspectRatioBatchSampler'``  :class:`gfl_det.data.AspectRatioBatchSampler` (equal batch counts on every rank)
``'DefaultSampler'``,       mmengine's, yielding :class:`gfl_det.data.SampleIndex` (each sample's
``'InfiniteSampler'``       augmentation drawn from (seed, epoch, index): exact with any workers)
``'gfl_collate'``           :func:`gfl_det.data.collate` (``collate_fn=dict(type='gfl_collate')``)
``'Resize'``, ``'RandomResize'``, ``'RandomFlip'``, ``'PhotoMetricDistortion'``,
``'LoadImageFromFile'``, ``'LoadAnnotations'``, ``'PackDetInputs'``: pipeline steps
``'CocoMetric'``            :class:`CocoMetric` -- pycocotools through :mod:`gfl_det.evaluation`
``'ReIDMetric'``            :class:`ReIDMetric` -- ``reid/`` metrics of the embedding branch
``'MultiViewDataset'``      :class:`gfl_det.data.MultiViewDataset` -- views x images per batch
``'OptimWrapper'``,         mmengine's, with the gradient norm kept on the device until logged;
``'AmpOptimWrapper'``       AMP that also runs on the CPU (bfloat16)
``'DeferredRuntimeInfoHook'``  mmengine's RuntimeInfoHook with one host sync per log interval
``'LoggerHook'``            :class:`ProgressLoggerHook` -- mmengine's, with ``interval='auto'``
                            (follows the epoch length) and progress lines from the first iterations
``'DrawPredictionsHook'``   writes pictures of the predictions (``tools/test.py --show-dir``)
``'CheckpointHook'``        mmengine's, saving (and choosing a best) only from a clean state
``'GFLRunner'``             :class:`GFLRunner` -- atomic, plain-data checkpoints, every one read
                            with ``weights_only=True`` (resume and ``load_from`` alike)
==========================  ===================================================================

One module per concern: ``registry`` (the registries), ``model`` (detector + data preprocessor),
``data`` (pipeline steps, datasets, sampler, collate), ``metric`` (COCO mAP), ``optim``
(optimizer wrappers, non-finite guard), ``hooks``, ``console`` (what the console shows, the
logger hook), ``runner`` (checkpoint policy: see there).
"""
from . import console, data, hooks, metric, model, optim, registry, reid_metric, runner  # noqa: F401 (registers)
from .data import CocoDetDataset, SyntheticCocoDataset, build_pipeline
from .console import ProgressLoggerHook
from .hooks import (CheckpointHook, DataReportHook, DeferredRuntimeInfoHook, DrawPredictionsHook,
                    ValRandomStateHook)
from .metric import CocoMetric
from .model import GFLDataPreprocessor, GFLDetector
from .optim import AmpOptimWrapper, OptimWrapper
from .reid_metric import ReIDMetric
from .registry import (DATA_SAMPLERS, DATASETS, FUNCTIONS, HOOKS, METRICS, MODELS, OPTIM_WRAPPERS, RUNNERS,
                       SCOPE, TRANSFORMS, register_all_modules)
from .runner import GFLRunner, MemoConfig, decode_message_hub, encode_message_hub

__all__ = ['SCOPE', 'MODELS', 'DATASETS', 'DATA_SAMPLERS', 'TRANSFORMS', 'FUNCTIONS', 'METRICS', 'HOOKS',
           'OPTIM_WRAPPERS', 'RUNNERS', 'register_all_modules', 'GFLDetector', 'GFLDataPreprocessor',
           'CocoDetDataset', 'SyntheticCocoDataset', 'build_pipeline', 'CocoMetric', 'ReIDMetric', 'OptimWrapper',
           'AmpOptimWrapper', 'DeferredRuntimeInfoHook', 'DrawPredictionsHook', 'ValRandomStateHook',
           'DataReportHook', 'CheckpointHook', 'ProgressLoggerHook', 'GFLRunner', 'MemoConfig', 'encode_message_hub',
           'decode_message_hub']
