"""Checking detection annotations and images: one place for every "bad input" rule.

Used by :class:`gfl_det.data.coco.CocoDataset` at load time, by evaluation and by
``tools/check_dataset.py`` (:mod:`gfl_det.data.groundtruth`); image files are checked and decoded
by :mod:`gfl_det.data.images` under the same reasons.

Policy (the same everywhere):

* A problem that makes the whole file unusable (unreadable / empty JSON, no images, no
  categories, duplicate ids) raises :class:`DatasetError` whose message names the file and the
  fix.
* A problem with one annotation or one image is a *counted, logged skip*: it goes into a
  :class:`SkipReport` (a counter per reason, with the file names) and loading goes on. Each
  reason has a severity: ``error`` (the data is wrong and should be fixed: ``check_dataset``
  exits non-zero), ``warning`` (repaired or dropped the way MMDetection does, e.g. a box
  clipped to the image) or ``info`` (normal filtering, e.g. training drops images without
  boxes).

Box rules (N = annotations; all vectorised over N with numpy):

========================  ========  ===================================================
reason                    severity  rule
========================  ========  ===================================================
``malformed_bbox``        error     ``bbox`` missing or not 4 numbers
``nan_bbox``              error     a coordinate is NaN or inf
``nonpositive_size``      error     w <= 0 or h <= 0 (zero or negative size)
``unknown_image``         error     ``image_id`` not in ``images``
``unknown_category``      error     ``category_id`` not in ``categories``
``outside_image``         error     no overlap with the image at all
``mostly_outside``        error     less than half of the box lies inside the image
``clipped``               warning   box crosses the image border (at least half inside):
                                    clipped to it, kept
``tiny_box``              warning   0 < w < 1 or 0 < h < 1 px: dropped as MMDetection does
``zero_area``             warning   the JSON's ``area`` <= 0: dropped as MMDetection does
========================  ========  ===================================================

Image rules: ``bad_image_entry`` (error: no file name / non-positive size), ``missing_image``,
``corrupt_image``, ``size_mismatch`` (errors, found when files are checked or decoded).
Whole-file: ``no_annotations`` (error: not one usable box). ``many_boxes`` (info): an image with
more boxes than a detector keeps per image (:mod:`gfl_det.data.groundtruth`, which also holds
the ground truth evaluation scores: these same rules).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

__all__ = ['DatasetError', 'BadImageError', 'SkipReport', 'SEVERITY', 'FIXES', 'load_coco_json',
           'check_coco_structure', 'validate_coco']

SEVERITY = {
    # file-level / image-level
    'bad_image_entry': 'error',
    'missing_image': 'error',
    'corrupt_image': 'error',
    'size_mismatch': 'error',
    # box-level
    'malformed_bbox': 'error',
    'nan_bbox': 'error',
    'nonpositive_size': 'error',
    'unknown_image': 'error',
    'unknown_category': 'error',
    'outside_image': 'error',
    'mostly_outside': 'error',
    'no_annotations': 'error',
    'clipped': 'warning',
    'tiny_box': 'warning',
    'zero_area': 'warning',
    # normal training-time filtering (mmdet filter_cfg)
    'no_boxes': 'info',
    'too_small': 'info',
    'many_boxes': 'info',
}

FIXES = {
    'missing_image': 'check the image folder (img_dir) or remove the image from the JSON',
    'corrupt_image': 're-download / re-encode the file or remove it from the JSON',
    'size_mismatch': "fix the image's width/height in the JSON (or an EXIF rotation: "
                     're-save the image without the orientation tag)',
    'nonpositive_size': 'fix or delete the box (COCO bbox is [x, y, width, height])',
    'nan_bbox': 'fix or delete the box',
    'malformed_bbox': 'a COCO bbox is 4 numbers [x, y, width, height]: fix or delete it',
    'bad_image_entry': 'give the image entry a file_name and a positive width and height',
    'clipped': 'kept, clipped to the image: training and evaluation use the clipped box',
    'tiny_box': 'left out (width or height < 1 px), as MMDetection leaves it out',
    'zero_area': "left out (the JSON's area <= 0), as MMDetection leaves it out",
    'unknown_category': "add the category to 'categories' or fix the annotation's category_id",
    'unknown_image': "add the image to 'images' or fix the annotation's image_id",
    'outside_image': 'fix the box or the image size in the JSON',
    'mostly_outside': 'fix the box or the image size in the JSON',
    'no_annotations': "point ann_file at an annotated split (an instances_*.json with "
                      "'annotations'; image_info_*.json files hold none): nothing to train on, "
                      'and every COCO metric would be -1',
    'many_boxes': 'a GFL model keeps at most test_cfg.max_per_img (100) detections per image '
                  'and COCOeval counts 100 (maxDets): recall on these images is capped',
}


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names the file and the fix.

    Raised in a DataLoader worker process, torch re-raises it in the training process as
    ``type(e)(message)`` with a message of its own ('Caught DatasetError in DataLoader worker
    process 0. Original Traceback ...'); the original message is recovered from it, so the
    tools print the same one clean ``error:`` line with any ``num_workers``."""

    def __init__(self, *args: Any):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_from_worker(args[0], type(self).__name__),)
        super().__init__(*args)


def _from_worker(msg: str, name: str) -> str:
    """The original message inside torch's re-raise text of a DataLoader worker's exception
    (``msg`` unchanged if it is not one)."""
    head = re.match(r'Caught \w+ (in DataLoader worker process \d+)\.\s*\nOriginal Traceback', msg)
    if not head:
        return msg
    last = None
    for last in re.finditer(rf'^(?:[\w.]+\.)?{name}: ', msg, re.M):
        pass
    return msg if last is None else f'{msg[last.end():].strip()} ({head.group(1)})'


class BadImageError(DatasetError):
    """One image file cannot be used (missing, corrupt, or its size disagrees with the JSON).

    Attributes: ``path``, ``reason`` (a :data:`SEVERITY` key; both parsed back from the
    message when torch re-raises the error from a DataLoader worker).
    """

    def __init__(self, path: Union[str, os.PathLike], reason: Optional[str] = None,
                 detail: str = ''):
        if reason is None:  # re-raised by torch from a worker: the message only
            super().__init__(str(path))
            msg = str(self)
            self.reason = next((r for r in SEVERITY if msg.startswith(r.replace('_', ' ') + ': ')),
                               'corrupt_image')
            self.path = re.split(r' \(|; ', msg.split(': ', 1)[-1])[0]
            return
        self.path = str(path)
        self.reason = reason
        fix = FIXES.get(reason, '')
        super().__init__(f'{reason.replace("_", " ")}: {self.path}'
                         + (f' ({detail})' if detail else '') + (f'; fix: {fix}' if fix else '')
                         + '; run tools/check_dataset.py ANN_FILE IMG_DIR to list every problem')


class SkipReport:
    """Counter of skipped/repaired items per reason, with where each one came from.

    ``report.add('nonpositive_size', 'BloodImage_00338.jpg', n=1)``; ``report.counts`` is a
    :class:`collections.Counter`; ``report.where[reason]`` lists the file names (one entry per
    item, so a file with two bad boxes appears twice). ``str(report)`` is a summary.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.where: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, where: Union[str, Iterable[str]], n: Optional[int] = None) -> None:
        items = [where] if isinstance(where, str) else [str(w) for w in where]
        self.counts[reason] += len(items) if n is None else n
        self.where[reason].extend(items)

    def merge(self, other: 'SkipReport') -> 'SkipReport':
        self.counts.update(other.counts)
        for k, v in other.where.items():
            self.where[k].extend(v)
        return self

    def add_from_metas(self, metas: Iterable[dict]) -> 'SkipReport':
        """Count the bad images that training replaced, from batch metas.

        With DataLoader workers each worker has its own copy of ``dataset.skipped``; the
        replacement sample carries ``meta['skipped'] = [(reason, file_name), ...]`` so the
        main process can keep the true total: ``report.add_from_metas(batch['metas'])``.
        """
        for m in metas:
            for reason, name in m.get('skipped', ()):
                self.add(reason, name)
        return self

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def files(self, reason: str) -> list[str]:
        """Unique file names for a reason, in first-seen order."""
        return list(dict.fromkeys(self.where.get(reason, [])))

    def by_severity(self, severity: str) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if v and SEVERITY.get(k, 'error') == severity}

    @property
    def errors(self) -> dict[str, int]:
        return self.by_severity('error')

    @property
    def warnings(self) -> dict[str, int]:
        return self.by_severity('warning')

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {k: {'count': v, 'severity': SEVERITY.get(k, 'error'), 'files': self.files(k)}
                for k, v in self.counts.items() if v}

    def lines(self, max_files: int = 5, severities: Iterable[str] = ('error', 'warning', 'info')
              ) -> list[str]:
        out = []
        for sev in severities:
            for reason, n in sorted(self.by_severity(sev).items()):
                files = self.files(reason)
                shown = ', '.join(files[:max_files]) + (f', ... (+{len(files) - max_files})'
                                                         if len(files) > max_files else '')
                fix = FIXES.get(reason)
                note = 'fix' if sev == 'error' else 'note'
                out.append(f'[{sev}] {reason}: {n} ({shown})' + (f' -- {note}: {fix}' if fix else ''))
        return out

    def __str__(self) -> str:
        return '\n'.join(self.lines()) or 'no problems'

    def __repr__(self) -> str:
        return f'SkipReport({dict(self.counts)})'


# --------------------------------------------------------------------------------------------
# JSON

def load_coco_json(path: Union[str, os.PathLike]) -> dict:
    """Read a COCO instances JSON; raise :class:`DatasetError` naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f'annotation file not found: {path}; fix: check the path (ann_file)')
    if path.stat().st_size == 0:
        raise DatasetError(f'annotation file is empty (0 bytes): {path}; fix: regenerate or '
                           're-download it')
    try:
        with open(path, 'rb') as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f'annotation file is not valid JSON: {path} ({e}); fix: regenerate '
                           'or re-download it') from None
    check_coco_structure(data, path)
    return data


def check_coco_structure(data: Any, path: Union[str, os.PathLike] = '<dict>') -> None:
    """File-level checks: raise :class:`DatasetError` for a JSON that cannot be used at all."""
    if not isinstance(data, dict) or not data:
        raise DatasetError(f'annotation file {path} holds no COCO dataset (got '
                           f'{type(data).__name__} {str(data)[:40]!r}); fix: it must be a dict '
                           "with 'images', 'annotations' and 'categories' lists")
    for key in ('images', 'categories'):
        if not isinstance(data.get(key), list) or not data[key]:
            raise DatasetError(f"annotation file {path} has no {key!r} (missing or empty list); "
                               "fix: a COCO instances JSON needs non-empty 'images' and "
                               "'categories' lists")
    if not isinstance(data.get('annotations', []), list):
        raise DatasetError(f"annotation file {path}: 'annotations' must be a list")
    for key, what in (('images', 'image'), ('categories', 'category')):
        try:
            ids = [int(x['id']) for x in data[key]]
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"annotation file {path}: every {what} needs an integer 'id'; "
                               'fix the entries without one') from None
        dup = [i for i, c in Counter(ids).items() if c > 1]
        if dup:
            raise DatasetError(f'annotation file {path}: duplicate {what} ids {dup[:10]}; fix: '
                               'ids must be unique')


# --------------------------------------------------------------------------------------------
# annotations

def _bbox_array(anns: list) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) float64 COCO xywh and a (N,) bool 'malformed' mask."""
    if not anns:
        return np.zeros((0, 4)), np.zeros(0, bool)
    try:
        arr = np.asarray([a['bbox'] for a in anns], dtype=np.float64).reshape(len(anns), -1)
        if arr.shape[1] == 4:
            return arr, np.zeros(len(anns), bool)
    except (KeyError, TypeError, ValueError):
        pass
    arr = np.full((len(anns), 4), np.nan)
    bad = np.zeros(len(anns), bool)
    for i, a in enumerate(anns):  # slow path only when some entry is broken
        try:
            b = np.asarray(a['bbox'], dtype=np.float64)
            if b.shape != (4,):
                raise ValueError
            arr[i] = b
        except (KeyError, TypeError, ValueError):
            bad[i] = True
    return arr, bad


def _num(x: Any, typ: type, default):
    try:
        return typ(x)
    except (TypeError, ValueError):
        return default


def validate_coco(data: dict, *, skipped: Optional[SkipReport] = None,
                  need_file_name: bool = True) -> dict:
    """Validate and convert the annotations of a COCO dict (structure already checked).

    Returns ``{'cat_ids', 'classes', 'images', 'skipped', 'ann_keep', 'ann_xyxy',
    'ann_clipped'}`` where ``images`` is a list, in JSON order, of dicts with ``img_id,
    file_name, height, width`` and numpy arrays ``boxes`` (n, 4) float32 xyxy (clipped to the
    image), ``labels`` (n,) int64 contiguous, ``boxes_ignore`` (k, 4) float32 xyxy (``iscrowd``
    boxes, the same checks applied), ``ann_ids`` (n,) int64. Images with a bad entry are left
    out (counted; ``need_file_name=False``: an entry without a file name is fine -- for
    evaluation, which reads no image). Per JSON annotation (N,): ``ann_keep`` whether it is used,
    ``ann_xyxy`` its box clipped to its image (float64), ``ann_clipped`` whether clipping moved it.
    """
    rep = skipped if skipped is not None else SkipReport()
    cats = sorted(data['categories'], key=lambda c: int(c['id']))
    cat_ids = [int(c['id']) for c in cats]
    classes = tuple(str(c.get('name', c['id'])) for c in cats)

    images = []
    for im in data['images']:
        name = str(im.get('file_name', ''))
        try:
            h, w = int(im['height']), int(im['width'])
            ok = (bool(name) or not need_file_name) and h > 0 and w > 0
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            rep.add('bad_image_entry', name or f'image id {im["id"]}')
            continue
        images.append({'img_id': int(im['id']), 'file_name': name, 'height': h, 'width': w})
    img_index = {im['img_id']: i for i, im in enumerate(images)}
    bad_entry_ids = {int(im['id']) for im in data['images']} - set(img_index)

    anns = [a if isinstance(a, dict) else {} for a in data.get('annotations', [])]
    n = len(anns)
    xywh, malformed = _bbox_array(anns)                                   # (N, 4), (N,)
    ann_img = np.array([_num(a.get('image_id'), int, -1) for a in anns], np.int64)
    ann_cat = np.array([_num(a.get('category_id'), int, -1) for a in anns], np.int64)
    ann_ids = np.array([_num(a.get('id'), int, i) for i, a in enumerate(anns)], np.int64)
    crowd = np.array([bool(a.get('iscrowd', 0)) for a in anns], bool)
    area = np.array([_num(a.get('area'), float, 1.0) for a in anns], np.float64)

    # where each annotation lives, for the report
    idx = np.array([img_index.get(int(i), -1) for i in ann_img], np.int64)   # (N,)
    names = np.array([im['file_name'] for im in images] + ['?'], dtype=object)

    def where(mask):
        return [names[j] if j >= 0 else f'annotation id {a} (image id {i})'
                for j, a, i in zip(idx[mask], ann_ids[mask], ann_img[mask])]

    keep = np.ones(n, bool)

    def drop(mask, reason):
        mask = mask & keep
        if mask.any():
            rep.add(reason, where(mask))
            keep[mask] = False

    # anns on an image whose own entry was bad go with that image (already counted)
    on_bad_entry = np.isin(ann_img, list(bad_entry_ids)) if bad_entry_ids else np.zeros(n, bool)
    keep &= ~on_bad_entry
    drop(idx < 0, 'unknown_image')
    unknown_cat = ~np.isin(ann_cat, cat_ids) & keep
    if unknown_cat.any():  # name the id too: 'file.jpg (category_id 999)'
        rep.add('unknown_category', [f'{w} (category_id {c})' for w, c in
                                     zip(where(unknown_cat), ann_cat[unknown_cat])])
        keep[unknown_cat] = False
    drop(malformed, 'malformed_bbox')
    drop(~np.isfinite(xywh).all(1), 'nan_bbox')
    with np.errstate(invalid='ignore'):
        drop((xywh[:, 2] <= 0) | (xywh[:, 3] <= 0), 'nonpositive_size')
        # MMDetection's CocoDataset.parse_data_info drops these (w < 1 or h < 1, area <= 0)
        drop((xywh[:, 2] < 1) | (xywh[:, 3] < 1), 'tiny_box')
        drop(area <= 0, 'zero_area')

    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)  # (N, 4)
    wh = np.array([[im['width'], im['height']] for im in images] + [[0, 0]], np.float64)[idx]
    clipped = xyxy.copy()
    clipped[:, 0::2] = np.clip(xyxy[:, 0::2], 0, wh[:, :1])
    clipped[:, 1::2] = np.clip(xyxy[:, 1::2], 0, wh[:, 1:])
    with np.errstate(invalid='ignore', over='ignore'):
        inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        changed = np.abs(clipped - xyxy).max(1) > 0
        # a box mostly outside its image is wrong (coordinates or image size), not clippable
        area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
        mostly_outside = inside & changed & ~(area(clipped) >= 0.5 * area(xyxy))
    drop(~inside, 'outside_image')
    drop(mostly_outside, 'mostly_outside')
    if (changed & keep).any():
        rep.add('clipped', where(changed & keep))   # kept, clipped (counted, not dropped)

    labels = np.searchsorted(np.asarray(cat_ids), np.where(keep, ann_cat, cat_ids[0]))
    order = np.argsort(np.where(keep, idx, -1), kind='stable')
    order = order[keep[order]]
    starts = np.searchsorted(idx[order], np.arange(len(images) + 1))
    for j, im in enumerate(images):
        sel = order[starts[j]:starts[j + 1]]
        c = crowd[sel]
        im['boxes'] = clipped[sel[~c]].astype(np.float32).reshape(-1, 4)
        im['labels'] = labels[sel[~c]].astype(np.int64)
        im['ann_ids'] = ann_ids[sel[~c]]
        im['boxes_ignore'] = clipped[sel[c]].astype(np.float32).reshape(-1, 4)
    return {'cat_ids': cat_ids, 'classes': classes, 'images': images, 'skipped': rep,
            'ann_keep': keep, 'ann_xyxy': clipped, 'ann_clipped': changed & keep}
