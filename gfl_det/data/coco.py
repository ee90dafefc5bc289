"""COCO-format detection dataset.

``CocoDataset(ann_file, img_dir, transforms, test_mode=False)`` yields the contract's samples::

    {'image': uint8 (3, h, w) RGB, 'boxes': float32 (n, 4) xyxy, 'labels': int64 (n,),
     'meta': {'img_id', 'file_name', 'ori_shape', 'img_shape', 'scale_factor', 'flip'}}

Annotations (as MMDetection's ``CocoDataset``, deviations flagged):

* categories are sorted by id; ``cat_ids[i]`` is the COCO id of contiguous label ``i`` and
  ``classes[i]`` its name, both from the JSON (COCO: ids 1..90 with gaps -> labels 0..79);
* ``iscrowd`` boxes are not training targets; they are kept per image as ``boxes_ignore`` in
  :meth:`get_ann_info` (evaluation handles them itself: pycocotools treats crowd GT as ignore
  regions);
* COCO ``[x, y, w, h]`` becomes ``[x1, y1, x2, y2]``; every annotation is validated at load,
  vectorised (:func:`gfl_det.data.validation.validate_coco`): bad boxes are skipped and counted
  in ``dataset.skipped`` (a :class:`SkipReport`), boxes crossing the border are clipped and
  counted;
* training (``test_mode=False``) drops images with no box (``filter_empty_gt``) and images whose
  shorter side is < ``min_size`` (32), as mmdet's ``filter_cfg``; evaluation keeps every image.
  Deviation: an image whose only boxes are crowd boxes is kept for training, as in mmdet
  (it is a negative image there); an image whose only boxes are invalid is dropped.

Bad images (policy):

* load time: every file is checked to exist (``check_images='exists'``; ``'header'`` also
  reads sizes, ``'decode'`` decodes everything, ``'none'`` trusts the JSON). In training a bad
  file is dropped and counted; in evaluation it raises :class:`DatasetError` listing them,
  unless ``on_bad_image='skip'``, which counts them (``dataset.failed_images`` gives the names
  for the evaluator's report) and keeps them in the index as *failed samples* (below).
* ``__getitem__`` time (missing, undecodable, truncated, or size different from the JSON): in
  training (``on_bad_image='resample'``) the problem is logged, counted in ``dataset.skipped``
  and a random other image is returned instead; its ``meta['skipped']`` lists
  ``(reason, file)`` of what it replaces, so a main process can count skips that happened in
  worker processes. More than ``max_retries`` bad images in a row raise. In evaluation it
  raises :class:`BadImageError` (file name and fix in the message), unless
  ``on_bad_image='skip'``: then a *failed sample* is returned -- a blank 32x32 image with no
  boxes whose ``meta['load_failed']`` is the reason -- so the batch keeps its place and the
  evaluator (:class:`gfl_det.evaluation.CocoEvaluator`) counts and reports the image as failed
  instead of scoring it (this works across DataLoader worker processes, which cannot report
  back any other way).

Memory: per-image data is packed into a few numpy arrays (no list of dicts), so forked
DataLoader workers do not copy it page by page through reference counting; the pycocotools
index is only built on demand (:attr:`coco`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from functools import cached_property
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .identity import annotation_identities, lookup
from .images import check_image_file, load_image
from .loader import sample_rng
from .transforms import build_transforms
from .validation import BadImageError, DatasetError, SkipReport, load_coco_json, validate_coco

__all__ = ['CocoDataset', 'to_sample']

# Warnings for plain-PyTorch use. Under GFLRunner they are silenced (a NullHandler): there
# DataReportHook and the evaluator report the same problems once, in the run's log.
logger = logging.getLogger('gfl_det.data')


def to_sample(results: dict) -> dict:
    """numpy results dict -> contract sample (torch tensors, CHW uint8 image)."""
    img = results['image']
    return {
        'image': torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
        'boxes': torch.from_numpy(np.asarray(results['boxes'], np.float32).reshape(-1, 4)),
        'labels': torch.from_numpy(np.asarray(results['labels'], np.int64).reshape(-1)),
        'meta': results['meta'],
        **({'ids': torch.from_numpy(np.asarray(results['ids'], np.int64).reshape(-1))} if 'ids' in results else {}),
    }


def _pack(arrays: list, width: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-image arrays: (sum n, width) data and (N + 1,) offsets."""
    offsets = np.zeros(len(arrays) + 1, np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    data = (np.concatenate(arrays).astype(dtype) if arrays
            else np.zeros((0,) if width == 0 else (0, width), dtype))
    return data, offsets


class CocoDataset(Dataset):
    """COCO instances JSON + image folder -> contract samples.

    Args:
        ann_file: COCO instances JSON.
        img_dir: folder the JSON's ``file_name`` entries are relative to.
        transforms: a callable on the results dict, or a dict of
            :func:`build_transforms` keyword arguments (``train`` is set from ``test_mode``),
            or None for the default pipeline (1333x800 keep-ratio; flip 0.5 in training).
        test_mode: evaluation dataset: keep every image, raise on bad images by default.
        filter_empty_gt: drop images without boxes (default: ``not test_mode``).
        min_size: drop images whose shorter side is smaller, in training (mmdet: 32).
        check_images: ``'none' | 'exists' | 'header' | 'decode'`` check of the files at load.
        on_bad_image: ``'resample'`` (training default), ``'raise'`` (evaluation default) or
            ``'skip'`` (evaluation: a bad file gives a failed sample, counted and reported by
            the evaluator; in training: files found bad at load time are dropped).
        max_retries: consecutive bad images tolerated by ``'resample'``.
        identities: ``None``, ``'instance_id'`` or ``'annotation'``: samples carry ``ids``, each
            box's identity (:mod:`gfl_det.data.identity`; ``identity_names`` maps them back).
    """

    def __init__(self, ann_file: Union[str, os.PathLike], img_dir: Union[str, os.PathLike],
                 transforms: Union[None, dict, Callable] = None, *, test_mode: bool = False,
                 filter_empty_gt: Optional[bool] = None, min_size: int = 32,
                 check_images: str = 'exists', on_bad_image: Optional[str] = None,
                 max_retries: int = 20, identities: Optional[str] = None):
        self.ann_file = str(ann_file)
        self.img_dir = str(img_dir)
        self.test_mode = bool(test_mode)
        if on_bad_image is None:
            on_bad_image = 'raise' if test_mode else 'resample'
        if on_bad_image not in ('resample', 'raise', 'skip'):
            raise ValueError(f"on_bad_image must be 'resample', 'raise' or 'skip', "
                             f'got {on_bad_image!r}')
        if check_images not in ('none', 'exists', 'header', 'decode'):
            raise ValueError(f"check_images must be 'none', 'exists', 'header' or 'decode', "
                             f'got {check_images!r}')
        self.on_bad_image = on_bad_image
        self.max_retries = int(max_retries)
        if filter_empty_gt is None:
            filter_empty_gt = not test_mode
        if transforms is None:
            transforms = build_transforms(train=not test_mode)
        elif isinstance(transforms, dict):
            transforms = build_transforms(train=not test_mode, **transforms)
        self.transforms = transforms

        self.skipped = SkipReport()
        data = load_coco_json(self.ann_file)
        parsed = validate_coco(data, skipped=self.skipped)
        self.identities = identities
        id_of, self.identity_names = (annotation_identities(data, identities, self.ann_file)
                                      if identities else (None, None))
        self.cat_ids: list[int] = parsed['cat_ids']
        self.classes: tuple[str, ...] = parsed['classes']
        self.cat2label = {c: i for i, c in enumerate(self.cat_ids)}
        self.label2cat = dict(enumerate(self.cat_ids))
        images = parsed['images']
        self._load_failed: list[str] = []
        self._bad_idx: dict[int, str] = {}    # index -> reason, found bad by __getitem__
        known_bad: dict[int, str] = {}        # index -> reason, found bad at load ('skip')

        if check_images != 'none':
            bad = []
            for im in images:
                r = check_image_file(os.path.join(self.img_dir, im['file_name']),
                                     im['height'], im['width'], check_images)
                if r is not None:
                    bad.append((im, r))
            if bad and test_mode and on_bad_image == 'raise':
                lines = [f"  {r[0]}: {os.path.join(self.img_dir, im['file_name'])} ({r[1]})"
                         for im, r in bad[:10]]
                raise DatasetError(
                    f'{len(bad)} of {len(images)} images of {self.ann_file} cannot be used:\n'
                    + '\n'.join(lines) + ('\n  ...' if len(bad) > 10 else '')
                    + '\nfix: restore the files (img_dir is ' + self.img_dir + ') or remove them '
                    "from the JSON; or pass on_bad_image='skip' to evaluate without them "
                    '(they are counted and reported)')
            for im, (reason, detail) in bad:
                self.skipped.add(reason, im['file_name'])
                self._load_failed.append(im['file_name'])
            bad_names = {im['file_name']: r[0] for im, r in bad}
            if test_mode and on_bad_image == 'skip':  # kept: __getitem__ gives failed samples
                known_bad = {i: bad_names[im['file_name']] for i, im in enumerate(images)
                             if im['file_name'] in bad_names}
            else:
                images = [im for im in images if im['file_name'] not in bad_names]

        if not test_mode:
            kept = []
            for im in images:
                if filter_empty_gt and len(im['boxes']) + len(im['boxes_ignore']) == 0:
                    self.skipped.add('no_boxes', im['file_name'])
                elif min(im['height'], im['width']) < min_size:
                    self.skipped.add('too_small', im['file_name'])
                else:
                    kept.append(im)
            images = kept
        if not images:
            raise DatasetError(f'no usable image in {self.ann_file} (img_dir {self.img_dir}):\n'
                               f'{self.skipped}\nfix: see the problems above, or run '
                               'tools/check_dataset.py ANN_FILE IMG_DIR')
        if self.skipped.errors or self.skipped.warnings:  # (GFLRunner: DataReportHook reports)
            logger.warning('%s: problems found at load (skipped, or repaired as noted; '
                           'dataset.skipped holds them):\n%s', self.ann_file,
                           '\n'.join(self.skipped.lines(severities=('error', 'warning'))))

        # packed per-image storage (see module docstring: no list of dicts)
        self.img_ids: list[int] = [im['img_id'] for im in images]
        self._img_ids = np.array(self.img_ids, np.int64)
        self._names = np.array([im['file_name'] for im in images])
        self._hw = np.array([[im['height'], im['width']] for im in images], np.int64)  # (N, 2)
        self._boxes, self._box_off = _pack([im['boxes'] for im in images], 4, np.float32)
        self._labels, _ = _pack([im['labels'] for im in images], 0, np.int64)
        self._ign, self._ign_off = _pack([im['boxes_ignore'] for im in images], 4, np.float32)
        self._ids = _pack([lookup(id_of, im['ann_ids']) for im in images], 0, np.int64)[0] if identities else None
        self._bad_idx.update(known_bad)
        if known_bad and len(known_bad) == len(images):
            raise DatasetError(f'no usable image in {self.ann_file} (img_dir {self.img_dir}):\n'
                               f'{self.skipped}\nfix: see the problems above, or run '
                               'tools/check_dataset.py ANN_FILE IMG_DIR')

    # ------------------------------------------------------------------ info
    def __len__(self) -> int:
        return len(self._img_ids)

    @property
    def img_shapes(self) -> np.ndarray:
        """(N, 2) int64 original (height, width) of every image, from the JSON."""
        return self._hw

    @property
    def aspect_flags(self) -> np.ndarray:
        """(N,) uint8: 1 where width >= height (landscape/square), 0 portrait (as mmdet)."""
        return (self._hw[:, 1] >= self._hw[:, 0]).astype(np.uint8)

    @property
    def failed_images(self) -> list[str]:
        """File names that could not be loaded (at load time, and at __getitem__ in this
        process), for the evaluator's report."""
        return list(dict.fromkeys(self._load_failed))

    def get_ann_info(self, idx: int) -> dict[str, Any]:
        """Annotations of image ``idx`` in the original frame (xyxy, clipped, float32)."""
        a, b = self._box_off[idx], self._box_off[idx + 1]
        c, d = self._ign_off[idx], self._ign_off[idx + 1]
        h, w = self._hw[idx]
        return {'img_id': int(self._img_ids[idx]), 'file_name': str(self._names[idx]),
                'height': int(h), 'width': int(w), 'boxes': self._boxes[a:b].copy(),
                'labels': self._labels[a:b].copy(), 'boxes_ignore': self._ign[c:d].copy(),
                **({'ids': self._ids[a:b].copy()} if self._ids is not None else {})}

    def img_path(self, idx: int) -> str:
        return os.path.join(self.img_dir, str(self._names[idx]))

    @cached_property
    def coco(self):
        """pycocotools ``COCO`` of the annotation file (built on first use, quietly)."""
        from pycocotools.coco import COCO
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(self.ann_file)

    def __repr__(self) -> str:
        return (f'CocoDataset({self.ann_file!r}, {len(self)} images, {len(self._boxes)} boxes, '
                f'{len(self.classes)} classes, test_mode={self.test_mode}, '
                f'skipped={dict(self.skipped.counts)})')

    # ------------------------------------------------------------------ items
    def load_results(self, idx: int) -> dict:
        """Decode image ``idx`` and its annotations (before transforms); BadImageError."""
        path = self.img_path(idx)
        img = load_image(path)
        H, W = (int(v) for v in self._hw[idx])
        if img.shape[:2] != (H, W):
            raise BadImageError(path, 'size_mismatch',
                                f'file is {img.shape[1]}x{img.shape[0]}, JSON says {W}x{H}')
        ann = self.get_ann_info(idx)
        return {'image': img, 'boxes': ann['boxes'], 'labels': ann['labels'],
                **({'ids': ann['ids']} if 'ids' in ann else {}),
                'meta': {'img_id': ann['img_id'], 'file_name': ann['file_name'],
                         'ori_shape': (H, W), 'img_shape': (H, W), 'scale_factor': (1.0, 1.0),
                         'flip': False}}

    def failed_sample(self, idx: int, reason: str) -> dict:
        """The stand-in for image ``idx`` that could not be loaded (evaluation with
        ``on_bad_image='skip'``): a blank 32x32 image, no boxes, ``meta['load_failed'] =
        reason``. Models run on it like on any image; evaluators must not score it."""
        H, W = (int(v) for v in self._hw[idx])
        s = 32
        return {'image': torch.zeros((3, s, s), dtype=torch.uint8),
                'boxes': torch.zeros((0, 4), dtype=torch.float32),
                'labels': torch.zeros((0,), dtype=torch.int64),
                **({'ids': torch.zeros((0,), dtype=torch.int64)} if self._ids is not None else {}),
                'meta': {'img_id': int(self._img_ids[idx]), 'file_name': str(self._names[idx]),
                         'ori_shape': (H, W), 'img_shape': (s, s),
                         'scale_factor': (s / W, s / H), 'flip': False, 'load_failed': reason}}

    def __getitem__(self, idx: int) -> dict:
        """Sample ``idx``; its random augmentation is drawn from ``sample_rng(idx)`` (from
        (seed, epoch, index) when ``idx`` is a :class:`gfl_det.data.loader.SampleIndex`), and so
        is the stand-in for a bad image in training."""
        rng = sample_rng(idx)
        idx = int(idx)
        if self.on_bad_image == 'skip' and self.test_mode:
            if idx in self._bad_idx:
                return self.failed_sample(idx, self._bad_idx[idx])
            try:
                results = self.load_results(idx)
            except BadImageError as e:
                self._count_bad(idx, e)
                self._bad_idx[idx] = e.reason
                logger.warning('image failed to load; it is counted and left out of the '
                               'evaluation: %s', e)
                return self.failed_sample(idx, e.reason)
            if self.transforms is not None:
                results = self.transforms(dict(results, rng=rng))
            return to_sample(results)
        replaced: list[tuple[str, str]] = []
        for _ in range(self.max_retries + 1):
            if idx in self._bad_idx:                      # known bad in this process
                replaced.append((self._bad_idx[idx], str(self._names[idx])))
                idx = self._other_index(rng)
                continue
            try:
                results = self.load_results(idx)
            except BadImageError as e:
                name = self._count_bad(idx, e)
                if self.on_bad_image != 'resample':
                    raise
                logger.warning('bad image skipped in training, another one is used instead: %s',
                               e)
                self._bad_idx[idx] = e.reason
                replaced.append((e.reason, name))
                idx = self._other_index(rng)
                continue
            if self.transforms is not None:
                results = self.transforms(dict(results, rng=rng))
            if replaced:
                results['meta']['skipped'] = replaced
            return to_sample(results)
        raise DatasetError(f'{len(replaced)} bad images in a row in {self.ann_file} (last: '
                           f'{replaced[-1][1]}: {replaced[-1][0]}); too many to go on. fix: run '
                           'tools/check_dataset.py ANN_FILE IMG_DIR and repair the dataset')

    def _count_bad(self, idx: int, e: BadImageError) -> str:
        """Count image ``idx`` that failed to load (``skipped`` and ``failed_images``); its name."""
        name = str(self._names[idx])
        self.skipped.add(e.reason, name)
        self._load_failed.append(name)
        return name

    def _other_index(self, rng: np.random.Generator) -> int:
        """A random index not known to be bad, drawn from the sample's generator: one draw per
        candidate, so every process picks the same stand-in whichever bad images it has met."""
        if len(self._bad_idx) >= len(self):
            raise DatasetError(f'every image of {self.ann_file} failed to load ({self.skipped}); '
                               'fix: check img_dir, or run tools/check_dataset.py')
        while True:
            j = int(rng.integers(len(self)))
            if j not in self._bad_idx:
                return j
