"""YOLO txt labels -> COCO instances dict (custom datasets; CLI: ``tools/yolo2coco.py``).

YOLO layout (Ultralytics / darknet): one ``.txt`` per image, same stem, in ``labels_dir``
(default: the image folder with its last ``images`` path part replaced by ``labels``), one
line per box ``class cx cy w h`` with the centre and size normalised to [0, 1] by the image
width / height; class indices are 0-based into ``classes``. An image without a label file (or
with an empty one) is a background image, kept.

Conversion: ``x1 = (cx - w / 2) * W``, ``y1 = (cy - h / 2) * H``, COCO ``bbox =
[x1, y1, w * W, h * H]`` (floats, exact), category id = class index + 1.

Problems are reported, never silent (``report[reason]`` = list of ``'file:line'``):
``malformed`` (not 5 numbers / NaN), ``unknown_class`` (index outside ``classes``),
``degenerate`` (w <= 0 or h <= 0: not written), ``clipped`` (crossing the image border:
clipped, written), ``outside_image`` (no overlap: not written), ``orphan_label`` (a label file
without an image). Unreadable images raise :class:`DatasetError`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from .validation import DatasetError

__all__ = ['yolo_to_coco', 'read_class_names']

IMG_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


def read_class_names(path: Union[str, os.PathLike]) -> list[str]:
    """Class names from ``classes.txt`` / ``obj.names`` (one per line) or a ``data.yaml``
    with ``names:`` (a list or an ``{index: name}`` mapping)."""
    path = Path(path)
    if path.suffix in ('.yaml', '.yml'):
        import yaml
        names = (yaml.safe_load(path.read_text()) or {}).get('names')
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not names:
            raise DatasetError(f"{path} has no 'names:' list; fix: add the class names")
        return [str(n) for n in names]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def yolo_to_coco(img_dir: Union[str, os.PathLike], classes: Sequence[str],
                 labels_dir: Optional[Union[str, os.PathLike]] = None) -> tuple[dict, dict]:
    """Convert a YOLO-labelled image folder; returns ``(coco, report)``.

    ``coco['images'][i]['file_name']`` is relative to ``img_dir``. ``report`` has
    ``num_images, num_lines, num_boxes, background`` and the problem lists above.
    """
    from PIL import Image
    img_dir = Path(img_dir)
    if labels_dir is None:
        parts = list(img_dir.parts)
        if 'images' not in parts:
            raise DatasetError(f'cannot guess the labels folder of {img_dir} (no "images" in '
                               'the path); fix: pass labels_dir')
        k = len(parts) - 1 - parts[::-1].index('images')
        labels_dir = Path(*parts[:k], 'labels', *parts[k + 1:])
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise DatasetError(f'labels folder not found: {labels_dir}; fix: pass labels_dir')
    images = sorted(p for p in img_dir.rglob('*') if p.suffix.lower() in IMG_EXTS)
    if not images:
        raise DatasetError(f'no image in {img_dir}; fix: check the folder')
    classes = list(classes)
    report = {'num_images': len(images), 'num_lines': 0, 'num_boxes': 0, 'background': 0,
              'malformed': [], 'unknown_class': [], 'degenerate': [], 'clipped': [],
              'outside_image': [], 'orphan_label': []}
    coco_images, anns = [], []
    stems = set()
    for img_id, ip in enumerate(images, 1):
        rel = ip.relative_to(img_dir)
        stems.add(rel.with_suffix('').as_posix())
        try:
            with Image.open(ip) as im:
                W, H = im.size
        except (OSError, ValueError) as e:
            raise DatasetError(f'cannot read image {ip} ({e}); fix: restore or remove it') \
                from None
        coco_images.append({'id': img_id, 'file_name': rel.as_posix(), 'width': W, 'height': H})
        lp = labels_dir / rel.with_suffix('.txt')
        lines = lp.read_text().splitlines() if lp.is_file() else []
        n_before = len(anns)
        for ln, line in enumerate(lines, 1):
            if not line.strip():
                continue
            report['num_lines'] += 1
            where = f'{lp.name}:{ln}'
            try:
                vals = [float(v) for v in line.split()]
                if len(vals) != 5 or not all(math.isfinite(v) for v in vals) \
                        or not vals[0].is_integer():
                    raise ValueError
            except ValueError:
                report['malformed'].append(where)
                continue
            c, cx, cy, w, h = int(vals[0]), *vals[1:]
            if not 0 <= c < len(classes):
                report['unknown_class'].append(where)
                continue
            if w <= 0 or h <= 0:
                report['degenerate'].append(where)
                continue
            x1, y1, x2, y2 = (cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H
            cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, W), min(y2, H)
            if not (cx2 > cx1 and cy2 > cy1):
                report['outside_image'].append(where)
                continue
            if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
                report['clipped'].append(where)
            anns.append({'id': len(anns) + 1, 'image_id': img_id, 'category_id': c + 1,
                         'bbox': [cx1, cy1, cx2 - cx1, cy2 - cy1],
                         'area': (cx2 - cx1) * (cy2 - cy1), 'iscrowd': 0, 'segmentation': []})
        report['background'] += len(anns) == n_before
    for lp in sorted(labels_dir.rglob('*.txt')):
        stem = lp.relative_to(labels_dir).with_suffix('').as_posix()
        if stem not in stems and lp.name != 'classes.txt':
            report['orphan_label'].append(lp.name)
    report['num_boxes'] = len(anns)
    coco = {'info': {'description': f'converted from YOLO labels {labels_dir}'},
            'images': coco_images, 'annotations': anns,
            'categories': [{'id': i + 1, 'name': n} for i, n in enumerate(classes)]}
    return coco, report
