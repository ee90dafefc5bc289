"""Training / test transforms, MMDetection semantics, image ops from albumentations.

A transform is a callable on a *results* dict::

    {'image': np.uint8 (H, W, 3) RGB, 'boxes': np.float32 (n, 4) xyxy px,
     'labels': np.int64 (n,), 'meta': {'ori_shape': (H0, W0), 'img_shape': (h, w),
                                       'scale_factor': (w / W0, h / H0), 'flip': bool, ...}}

and returns it (new arrays, the input is not modified in place).

Pixel work is albumentations' (``albumentations.augmentations.geometric.functional.resize``
= cv2 bilinear like mmcv's ``imrescale``, ``A.HorizontalFlip``, colour transforms). The box
arithmetic is done here, exactly, next to it: albumentations' bbox processors normalise,
filter (min_visibility/min_area) and may reorder or drop boxes, while resize is a pure scale
and a horizontal flip is ``w - x``; doing it ourselves keeps the boxes invertible to float
precision (tests/test_data_coco.py maps them back to the JSON's boxes).

Randomness comes from ``results['rng']``, the sample's own ``numpy.random.Generator``, which the
dataset derives from (seed, epoch, sample index) (:func:`gfl_det.data.loader.sample_rng`): the
same sample gets the same augmentation in any worker process, with or without persistent
workers, before or after a resume. Without one (a transform called on its own) a generator is
seeded from numpy's global one. albumentations 2.x keeps its own generator per ``Compose``, so
:class:`PhotoMetricDistortion` seeds it from the sample's generator on every call.

Build a pipeline the way an mmdet config reads::

    build_transforms(train=True, scale=(1333, 800), ms_range=[(1333, 480), (1333, 960)],
                     flip_prob=0.5, photometric=False)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.geometric import functional as fgeometric

from .loader import sample_rng

__all__ = ['Compose', 'KeepRatioResize', 'RandomFlip', 'PhotoMetricDistortion',
           'build_transforms', 'rescale_size']

Scale = tuple[int, int]


def rescale_size(h: int, w: int, scale: Scale) -> tuple[int, int]:
    """New (h, w) for keep-ratio resize to ``scale`` = (long edge, short edge), as mmcv.

    mmcv.rescale_size: ``f = min(max(scale) / max(h, w), min(scale) / min(h, w))`` and
    ``new = int(x * f + 0.5)``.
    """
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * float(f) + 0.5), int(w * float(f) + 0.5)


def _copy(results: dict) -> dict:
    out = dict(results)
    out['meta'] = dict(results['meta'])
    return out


def _rng(results: dict) -> np.random.Generator:
    """The sample's generator (``results['rng']``), or one seeded from numpy's global."""
    rng = results.get('rng')
    return rng if rng is not None else sample_rng(None)


class Compose:
    """Apply transforms in order (``None`` entries are skipped)."""

    def __init__(self, transforms: Sequence[Optional[Callable]]):
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, results: dict) -> dict:
        for t in self.transforms:
            results = t(results)
        return results

    def __repr__(self) -> str:
        return 'Compose(\n' + ''.join(f'    {t!r},\n' for t in self.transforms) + ')'


class KeepRatioResize:
    """mmdet ``Resize(scale, keep_ratio=True)`` / ``RandomResize(ms_range, keep_ratio=True)``.

    Args:
        scale: (long, short) target, e.g. (1333, 800). Used when ``ms_range`` is None.
        ms_range: two (long, short) scales; each edge is sampled uniformly (integers, both
            ends included) from its range, as mmdet's ``RandomResize`` with two scales /
            mmdet 2.x ``multiscale_mode='range'``; e.g. [(1333, 480), (1333, 960)].
        interpolation: cv2 flag (mmcv default bilinear).
        clip: clip boxes to the new image (mmdet ``clip_object_border=True``).

    Boxes are scaled by the *realised* factors ``(new_w / w, new_h / h)`` (as mmdet does), which
    are the ``scale_factor`` stored in the meta.
    """

    def __init__(self, scale: Optional[Scale] = (1333, 800),
                 ms_range: Optional[Sequence[Scale]] = None,
                 interpolation: int = cv2.INTER_LINEAR, clip: bool = True):
        if ms_range is not None:
            ms_range = [tuple(int(v) for v in s) for s in ms_range]
            if len(ms_range) != 2 or any(len(s) != 2 for s in ms_range):
                raise ValueError(f'ms_range must be two (long, short) scales, got {ms_range}')
        elif scale is None or len(scale) != 2:
            raise ValueError(f'scale must be (long, short), got {scale}')
        self.scale = None if scale is None else tuple(int(v) for v in scale)
        self.ms_range = ms_range
        self.interpolation = interpolation
        self.clip = clip

    def sample_scale(self, rng: Optional[np.random.Generator] = None) -> Scale:
        if self.ms_range is None:
            return self.scale
        rng = rng if rng is not None else sample_rng(None)
        (a0, a1), (b0, b1) = self.ms_range
        e0 = rng.integers(min(a0, b0), max(a0, b0) + 1)
        e1 = rng.integers(min(a1, b1), max(a1, b1) + 1)
        return int(e0), int(e1)

    def __call__(self, results: dict) -> dict:
        out = _copy(results)
        img = results['image']
        h, w = img.shape[:2]
        nh, nw = rescale_size(h, w, self.sample_scale(results.get('rng')))
        out['image'] = fgeometric.resize(img, (nh, nw), self.interpolation)
        ws, hs = nw / w, nh / h
        boxes = np.asarray(results['boxes'], np.float64).reshape(-1, 4) * [ws, hs, ws, hs]
        if self.clip:
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, nw)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, nh)
        out['boxes'] = boxes.astype(np.float32)
        meta = out['meta']
        meta['img_shape'] = (nh, nw)
        # the contract's scale_factor is w / W0, h / H0 of the original image
        H0, W0 = meta.get('ori_shape', (h, w))
        meta['scale_factor'] = (nw / W0, nh / H0)
        return out

    def __repr__(self) -> str:
        what = f'ms_range={self.ms_range}' if self.ms_range else f'scale={self.scale}'
        return f'KeepRatioResize({what})'


class RandomFlip:
    """Horizontal flip with probability ``prob`` (mmdet ``RandomFlip(prob)``, horizontal).

    Boxes: ``x1' = w - x2, x2' = w - x1``; ``meta['flip']`` is set to whether it flipped.
    """

    def __init__(self, prob: float = 0.5):
        self.prob = float(prob)
        self._flip = A.HorizontalFlip(p=1.0)

    def __call__(self, results: dict) -> dict:
        out = _copy(results)
        out['meta'].setdefault('flip', False)
        if not (self.prob > 0 and _rng(results).random() < self.prob):
            return out
        img = results['image']
        w = img.shape[1]
        out['image'] = np.ascontiguousarray(self._flip(image=img)['image'])
        b = np.asarray(results['boxes'], np.float32).reshape(-1, 4)
        out['boxes'] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
        out['meta']['flip'] = not out['meta']['flip']
        return out

    def __repr__(self) -> str:
        return f'RandomFlip(prob={self.prob})'


class PhotoMetricDistortion:
    """Colour jitter on the image only, about mmdet's ``PhotoMetricDistortion``.

    albumentations: brightness +-32/255 of the range and contrast x[0.5, 1.5]
    (``RandomBrightnessContrast``), saturation x[0.5, 1.5] and hue +-18 degrees
    (``ColorJitter``), each applied with probability 0.5 like mmdet.
    Deviation: mmdet also randomises the order contrast-before/after-HSV; not done here.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5),
                 saturation_range=(0.5, 1.5), hue_delta: int = 18):
        self.aug = A.Compose([
            A.RandomBrightnessContrast(
                brightness_limit=(-brightness_delta / 255, brightness_delta / 255),
                contrast_limit=(contrast_range[0] - 1, contrast_range[1] - 1), p=0.5),
            A.ColorJitter(brightness=0, contrast=0, saturation=tuple(saturation_range),
                          hue=hue_delta / 360, p=0.5),
        ])

    def __call__(self, results: dict) -> dict:
        out = _copy(results)
        # albumentations' Compose owns a generator: seed it from the sample's on every call
        self.aug.set_random_seed(int(_rng(results).integers(0, 2 ** 31 - 1)))
        out['image'] = self.aug(image=results['image'])['image']
        return out

    def __repr__(self) -> str:
        return 'PhotoMetricDistortion()'


def build_transforms(train: bool, scale: Optional[Scale] = (1333, 800),
                     ms_range: Optional[Sequence[Scale]] = None, flip_prob: float = 0.5,
                     photometric: bool = False) -> Compose:
    """The standard pipelines.

    train: [PhotoMetricDistortion] -> KeepRatioResize(scale or ms_range) -> RandomFlip(flip_prob)
    test : KeepRatioResize(scale) (no flip, no colour, ``ms_range`` ignored).
    ``scale=None`` (and no ``ms_range``) keeps the image size.
    """
    resize = None
    if ms_range is not None and train:
        resize = KeepRatioResize(ms_range=ms_range)
    elif scale is not None:
        resize = KeepRatioResize(scale)
    if not train:
        return Compose([resize])
    return Compose([PhotoMetricDistortion() if photometric else None, resize,
                    RandomFlip(flip_prob) if flip_prob > 0 else None])
