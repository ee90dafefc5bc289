"""One cleaning of a COCO ground truth, shared by training, evaluation and ``check_dataset``.

The rules are :func:`gfl_det.data.validation.validate_coco`'s (NaN, malformed, zero or negative
size, tiny, zero area, unknown image or category, outside or mostly outside the image: left
out; crossing the border: clipped). Training uses what it keeps (:class:`CocoDataset`);
:func:`clean_coco_gt` gives evaluation the same boxes as a COCO dict for COCOeval, so a box the
loader rejected is never scored as ground truth (the dataset's own boxes, given back as
predictions, score AP 1.0); :func:`check_dataset` reports all of it in one pass, with the
whole-file and per-image notes (``no_annotations``, ``many_boxes``).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Union

from .images import check_image_file
from .validation import SkipReport, load_coco_json, validate_coco

__all__ = ['clean_coco_gt', 'check_dataset', 'MANY_BOXES']

MANY_BOXES = 100  # a GFL model's test_cfg.max_per_img, and COCOeval's largest maxDets


def clean_coco_gt(data: dict) -> tuple[dict, dict]:
    """The ground truth COCOeval should score: ``data`` (a COCO dict, structure checked) with
    only the annotations training keeps, each box clipped to its image as training clips it
    (``area`` kept from the JSON where positive, else the clipped box's), crowd boxes kept as
    crowd (ignore regions), and the images whose entries are usable (a file name is not needed
    here). Missing ``iscrowd`` becomes 0, a missing ``id`` a new unique one.

    Returns ``(clean, info)``; ``info``: ``'report'`` (:class:`SkipReport` of what was left out
    or clipped), ``'left_out'`` / ``'clipped'`` (annotation ids), ``'num_json'`` (annotations in
    the JSON), ``'num_scored'`` (non-crowd boxes kept).
    """
    rep = SkipReport()
    parsed = validate_coco(data, skipped=rep, need_file_name=False)
    anns = data.get('annotations') or []
    keep, xyxy, clipped = parsed['ann_keep'], parsed['ann_xyxy'], parsed['ann_clipped']
    kept_images = {im['img_id'] for im in parsed['images']}
    next_id = 1 + max([a['id'] for a in anns if isinstance(a, dict)
                       and isinstance(a.get('id'), int)] + [0])
    out, left_out, moved, scored = [], [], [], 0
    for i, a in enumerate(anns):
        ann_id = a.get('id') if isinstance(a, dict) else None
        if not keep[i]:
            left_out.append(ann_id if ann_id is not None else f'#{i}')
            continue
        if ann_id is None:
            ann_id, next_id = next_id, next_id + 1
        x1, y1, x2, y2 = (float(v) for v in xyxy[i])
        area = a.get('area')
        if not (isinstance(area, (int, float)) and area > 0):
            area = (x2 - x1) * (y2 - y1)
        crowd = int(bool(a.get('iscrowd', 0)))
        out.append(dict(a, id=ann_id, bbox=[x1, y1, x2 - x1, y2 - y1], area=float(area),
                        iscrowd=crowd))
        scored += 1 - crowd
        if clipped[i]:
            moved.append(ann_id)
    clean = dict(data, annotations=out,
                 images=[im for im in data['images'] if int(im['id']) in kept_images])
    return clean, {'report': rep, 'left_out': left_out, 'clipped': moved,
                   'num_json': len(anns), 'num_scored': scored}


def check_dataset(ann_file: Union[str, os.PathLike], img_dir: Union[str, os.PathLike],
                  level: str = 'decode', workers: int = 2, min_size: int = 32) -> dict:
    """Every problem of a COCO dataset in one pass (what ``tools/check_dataset.py`` prints).

    File-level problems (unreadable/empty JSON, ...) raise :class:`DatasetError`. Returns
    ``{'report': SkipReport, 'num_images', 'num_boxes' (usable, non-crowd), 'num_crowd',
    'num_annotations' (in the JSON), 'classes', 'class_counts'}``;
    ``report.errors`` non-empty means the data should be fixed. Images are checked at ``level``
    (see :func:`check_image_file`), in ``workers`` threads.
    """
    from concurrent.futures import ThreadPoolExecutor
    data = load_coco_json(ann_file)
    rep = SkipReport()
    parsed = validate_coco(data, skipped=rep)
    images = parsed['images']

    def one(im):
        return im, check_image_file(os.path.join(str(img_dir), im['file_name']),
                                    im['height'], im['width'], level)

    with ThreadPoolExecutor(max(1, workers)) as ex:
        for im, r in ex.map(one, images):
            if r is not None:
                rep.add(r[0], im['file_name'])
    counts: Counter = Counter()
    for im in images:
        if len(im['boxes']) + len(im['boxes_ignore']) == 0:
            rep.add('no_boxes', im['file_name'])
        if min(im['height'], im['width']) < min_size:
            rep.add('too_small', im['file_name'])
        if len(im['boxes']) > MANY_BOXES:
            rep.add('many_boxes', f"{im['file_name']} ({len(im['boxes'])} boxes)")
        counts.update(im['labels'].tolist())
    num_boxes = int(sum(len(im['boxes']) for im in images))
    anns = data.get('annotations') or []
    if num_boxes == 0:
        rep.add('no_annotations', f'{os.fspath(ann_file)}: {len(anns)} annotation(s), none usable')
    return {'report': rep, 'num_images': len(images), 'num_boxes': num_boxes,
            'num_crowd': int(sum(len(im['boxes_ignore']) for im in images)),
            'num_annotations': len(anns), 'classes': parsed['classes'],
            'class_counts': {parsed['classes'][k]: v for k, v in sorted(counts.items())}}
