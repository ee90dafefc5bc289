"""A small synthetic COCO-format detection dataset: coloured shapes on a noisy background.

Made to be learnt by a small detector on a CPU in minutes (the README's default job), and to
exercise the whole data path (JPEG files, COCO JSON, several image aspect ratios)::

    from gfl_det.data.synthetic import make_synthetic_coco
    paths = make_synthetic_coco('data/synthetic', num_train=300, num_val=60, seed=0)
    # paths == {'root', 'train_ann', 'train_img_dir', 'val_ann', 'val_img_dir'}

    python -m gfl_det.data.synthetic --out data/synthetic

Layout: ``ROOT/annotations/instances_{train,val}.json``, ``ROOT/{train,val}/*.jpg``.

Each class is one shape in one colour (the colour jittered a little), so shape and colour both
identify it: ``rectangle`` (red), ``ellipse`` (green), ``triangle`` (blue), ``diamond``
(yellow); category ids 1..4. Images are 320x320, 288x384 or 384x288 (h x w), 1-5 objects each,
16-120 px, aspect 1:2 to 2:1, overlapping at most a little (IoU <= 0.1); background: smooth
colour blobs plus pixel noise, muted so objects stand out. Boxes are the exact pixel extent of
each drawn shape (``[x0, y0, x1 + 1, y1 + 1]`` in COCO xywh), so they are tight.

Deterministic: the same arguments give byte-identical files (numpy ``default_rng(seed)``, the
validation split from an independent stream). Idempotent: when both JSONs exist, record the
same arguments in their ``info`` and every image file is present, nothing is written; otherwise
the dataset is (re)written, the JSONs last (atomically), so an interrupted run is redone.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

__all__ = ['make_synthetic_coco', 'SYNTHETIC_CLASSES', 'render_image']

# name, RGB colour
SYNTHETIC_CLASSES = (('rectangle', (220, 40, 40)), ('ellipse', (40, 200, 60)),
                     ('triangle', (50, 80, 230)), ('diamond', (235, 210, 40)))
IMAGE_SIZES = ((320, 320), (288, 384), (384, 288))   # (h, w)
VERSION = 1   # bump when the rendering changes, so stale datasets are rewritten


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random colour field (upsampled coarse noise) + fine noise, muted tones."""
    coarse = rng.uniform(70, 170, size=(4, 4, 3)).astype(np.float32)
    base = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    mid = cv2.resize(rng.normal(0, 12, size=(h // 16, w // 16, 3)).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_LINEAR)
    fine = rng.normal(0, 10, size=(h, w, 3)).astype(np.float32)
    # pull colours towards grey so saturated shapes stand out
    img = base + mid + fine
    grey = img.mean(2, keepdims=True)
    img = grey + 0.4 * (img - grey)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(cls: int, h: int, w: int, x0: int, y0: int, bw: int, bh: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    x1, y1 = x0 + bw - 1, y0 + bh - 1
    if cls == 0:
        cv2.rectangle(m, (x0, y0), (x1, y1), 1, thickness=-1)
    elif cls == 1:
        cv2.ellipse(m, (((x0 + x1) / 2, (y0 + y1) / 2), (bw, bh), 0), 1, thickness=-1)
    elif cls == 2:
        pts = np.array([[(x0 + x1) // 2, y0], [x1, y1], [x0, y1]], np.int32)
        cv2.fillPoly(m, [pts], 1)
    else:
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        pts = np.array([[cx, y0], [x1, cy], [cx, y1], [x0, cy]], np.int32)
        cv2.fillPoly(m, [pts], 1)
    return m


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def render_image(rng: np.random.Generator, h: int, w: int, min_obj: int = 16,
                 max_obj: int = 120, max_objects: int = 5) -> tuple[np.ndarray, list]:
    """One RGB uint8 image and its objects ``[(class_index, [x, y, w, h]), ...]``."""
    img = _background(rng, h, w)
    n = int(rng.integers(1, max_objects + 1))
    objects, placed = [], []
    for _ in range(n):
        for _try in range(30):
            size = float(np.exp(rng.uniform(np.log(min_obj), np.log(max_obj))))
            ar = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
            bw = int(np.clip(round(size * np.sqrt(ar)), min_obj, min(max_obj, w - 2)))
            bh = int(np.clip(round(size / np.sqrt(ar)), min_obj, min(max_obj, h - 2)))
            x0 = int(rng.integers(0, w - bw + 1))
            y0 = int(rng.integers(0, h - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            if all(_iou(box, p) <= 0.1 for p in placed):
                break
        else:
            continue
        cls = int(rng.integers(len(SYNTHETIC_CLASSES)))
        m = _shape_mask(cls, h, w, x0, y0, bw, bh)
        ys, xs = np.nonzero(m)
        colour = np.array(SYNTHETIC_CLASSES[cls][1], np.float32) + rng.uniform(-20, 20, 3)
        shade = rng.normal(0, 6, size=(len(ys), 3))
        img[ys, xs] = np.clip(colour + shade, 0, 255).astype(np.uint8)
        placed.append(box)
        x1, y1 = int(xs.min()), int(ys.min())
        objects.append((cls, [x1, y1, int(xs.max()) + 1 - x1, int(ys.max()) + 1 - y1]))
    return img, objects


def _split(root: Path, split: str, num: int, seed: int, info: dict, render=None) -> dict:
    """Write the images of one split; returns its COCO dict. ``render(rng, h, w, split)`` gives
    (image, objects); an object is ``(class_index, [x, y, w, h])``, optionally with a dict of
    more annotation fields as a third item (the identities set adds ``instance_id``)."""
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
    images, anns = [], []
    for i in range(num):
        h, w = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        img, objects = render(rng, h, w, split) if render else render_image(rng, h, w)
        name = f'{split}_{i:05d}.jpg'
        ok = cv2.imwrite(str(img_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                         [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise OSError(f'could not write {img_dir / name}')
        images.append({'id': i + 1, 'file_name': name, 'height': h, 'width': w})
        for cls, bbox, *extra in objects:
            anns.append({'id': len(anns) + 1, 'image_id': i + 1, 'category_id': cls + 1,
                         'bbox': [float(v) for v in bbox], 'area': float(bbox[2] * bbox[3]),
                         'iscrowd': 0, 'segmentation': [], **(extra[0] if extra else {})})
    return {'info': dict(info, split=split), 'images': images, 'annotations': anns,
            'categories': [{'id': k + 1, 'name': n, 'supercategory': 'shape'}
                           for k, (n, _) in enumerate(SYNTHETIC_CLASSES)]}


def _complete(root: Path, info: dict) -> bool:
    for split in ('train', 'val'):
        ann = root / 'annotations' / f'instances_{split}.json'
        if not ann.is_file():
            return False
        try:
            with open(ann) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False
        if data.get('info') != dict(info, split=split):
            return False
        if not all((root / split / im['file_name']).is_file() for im in data['images']):
            return False
    return True


def make_synthetic_coco(root: Union[str, os.PathLike], num_train: int = 300,
                        num_val: int = 60, seed: int = 0) -> dict:
    """Write (or find) the synthetic dataset under ``root``; return its paths.

    Returns ``{'root', 'train_ann', 'train_img_dir', 'val_ann', 'val_img_dir'}`` (str).
    """
    info = {'description': 'gfl_det synthetic shapes', 'version': VERSION,
            'num_train': int(num_train), 'num_val': int(num_val), 'seed': int(seed)}
    return write_synthetic(root, info, num_train, num_val, seed)


def write_synthetic(root: Union[str, os.PathLike], info: dict, num_train: int, num_val: int, seed: int,
                    render=None) -> dict:
    """The writer behind :func:`make_synthetic_coco` (and ``synthetic_reid``): nothing is written
    when the JSONs record ``info`` and every image exists; ``render`` as in :func:`_split`."""
    root = Path(root)
    paths = {'root': str(root),
             'train_ann': str(root / 'annotations' / 'instances_train.json'),
             'train_img_dir': str(root / 'train'),
             'val_ann': str(root / 'annotations' / 'instances_val.json'),
             'val_img_dir': str(root / 'val')}
    if _complete(root, info):
        return paths
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    for split, num in (('train', num_train), ('val', num_val)):
        ann = root / 'annotations' / f'instances_{split}.json'
        if ann.exists():
            ann.unlink()    # incomplete/stale: the JSON is the completion marker
    for split, num in (('train', num_train), ('val', num_val)):
        data = _split(root, split, num, seed, info, render)
        ann = root / 'annotations' / f'instances_{split}.json'
        tmp = ann.with_suffix('.json.tmp')
        with open(tmp, 'w') as f:
            json.dump(data, f)
        os.replace(tmp, ann)
    return paths


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description='Write the synthetic shapes dataset (COCO format).')
    p.add_argument('--out', default='data/synthetic', help='output folder')
    p.add_argument('--num-train', type=int, default=300)
    p.add_argument('--num-val', type=int, default=60)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    paths = make_synthetic_coco(a.out, a.num_train, a.num_val, a.seed)
    print(json.dumps(paths, indent=1))


if __name__ == '__main__':
    main()
