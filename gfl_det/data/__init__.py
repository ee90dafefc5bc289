"""Data side of gfl_det: COCO dataset, transforms, batching, synthetic and custom data.

See the contract in each module's docstring; the main entry points:

* :class:`CocoDataset` -- COCO JSON + images -> samples (uint8 CHW image, xyxy boxes, labels,
  meta); validation and skip reports (:class:`SkipReport`).
* :func:`build_transforms` -- keep-ratio resize (single or multi-scale), flip, colour.
* :func:`collate` -- samples -> padded batch with a gt valid mask.
* :class:`AspectRatioBatchSampler`, :func:`build_dataloader`; :class:`SampleIndex` /
  :func:`sample_rng`: every sample's augmentation drawn from (seed, epoch, index).
* :func:`make_synthetic_coco` -- the synthetic shapes dataset (``synthetic_reid``: with identities).
* identities of the boxes (``CocoDataset(identities=...)``, :mod:`.identity`) and
  :class:`MultiViewDataset` (two augmented views of each image in a batch).
* :func:`voc_to_coco` / :func:`yolo_to_coco` -- Pascal VOC XML / YOLO txt labels to COCO.
"""

from .coco import CocoDataset, to_sample
from .identity import IdentityError
from .identity_sampler import IdentityBatchSampler
from .collate import collate
from .loader import (AspectRatioBatchSampler, EpochSampler, SampleIndex, build_dataloader,
                     sample_rng, worker_init_fn)
from .synthetic import make_synthetic_coco
from .transforms import (Compose, KeepRatioResize, PhotoMetricDistortion, RandomFlip,
                         build_transforms, rescale_size)
from .images import load_image
from .validation import BadImageError, DatasetError, SkipReport
from .views import MultiViewDataset
from .voc import voc_to_coco
from .yolo import yolo_to_coco

__all__ = ['CocoDataset', 'to_sample', 'collate', 'AspectRatioBatchSampler', 'build_dataloader',
           'worker_init_fn', 'SampleIndex', 'sample_rng', 'EpochSampler', 'make_synthetic_coco', 'Compose', 'KeepRatioResize',
           'PhotoMetricDistortion', 'RandomFlip', 'build_transforms', 'rescale_size',
           'BadImageError', 'DatasetError', 'SkipReport', 'load_image',
           'voc_to_coco', 'yolo_to_coco', 'IdentityError', 'IdentityBatchSampler', 'MultiViewDataset']
