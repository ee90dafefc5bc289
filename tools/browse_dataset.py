#!/usr/bin/env python
"""See what the model is fed: dataset images after the config's pipeline, boxes and class names drawn.

    python tools/browse_dataset.py configs/gfl_r18_synthetic.py --out-dir browse/ --num 20
    python tools/browse_dataset.py configs/gfl_r18_bccd.py --out-dir browse/ --split val

Each image is written as it leaves the pipeline (resized, flipped, colour-jittered: the training
split's random augmentations are applied) with its ground-truth boxes in their class colours.
Annotations the dataset validation drops or changes (gfl_det/data/validation.py: zero or
negative size, tiny, outside the image, clipped at the border, unknown category, ...) are drawn
dashed in magenta, named ``class [reason]`` at their original place mapped through the same
resize and flip; a clipped box shows both: the clipped one the model sees and the original.
Boxes that cannot be drawn (NaN, malformed) are listed at the end with the rest.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys
from collections import Counter, defaultdict

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='config file')
    p.add_argument('--out-dir', required=True, help='where the pictures go')
    p.add_argument('--split', choices=['train', 'val', 'test'], default='train',
                   help='which dataloader\'s dataset (default train: with its augmentations)')
    p.add_argument('--num', type=int, default=20, help='how many images (default 20; 0 = all)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                   help='config overrides, key=value')
    return p.parse_args(argv)


class BadBoxes:
    """The annotations of an image that the validation drops or clips: each checked alone by
    :func:`gfl_det.data.validation.validate_coco`, so the rules are exactly the dataset's."""

    def __init__(self, data: dict):
        self.data = data
        self.images = {im.get('id'): im for im in data['images']}
        self.anns = defaultdict(list)
        for a in data.get('annotations', []):
            self.anns[a.get('image_id')].append(a)

    def __call__(self, img_id: int) -> list[tuple[object, object, str]]:
        """(COCO bbox, category id, reason) of each bad annotation of image ``img_id``."""
        import logging

        from gfl_det.data.validation import SEVERITY, validate_coco
        out = []
        log = logging.getLogger('gfl_det.data')
        level = log.level
        log.setLevel(logging.ERROR)  # validate_coco warns about each bad box: listed here instead
        try:
            for ann in self.anns.get(img_id, []):
                one = {'images': [self.images[img_id]], 'annotations': [ann],
                       'categories': self.data['categories']}
                reasons = [r for r, k in validate_coco(one)['skipped'].counts.items()
                           if k and SEVERITY.get(r) in ('error', 'warning')]
                if reasons:
                    out.append((ann.get('bbox'), ann.get('category_id'), reasons[0]))
        finally:
            log.setLevel(level)
        return out


def to_sample_coords(bbox, meta: dict):
    """COCO [x, y, w, h] of the original image -> xyxy in the pipeline's output (None if not
    4 finite numbers)."""
    import numpy as np
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not np.isfinite([x, y, w, h]).all():
        return None
    sx, sy = meta.get('scale_factor', (1.0, 1.0))
    box = np.array([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
    if meta.get('flip'):
        W = meta['img_shape'][1]
        box[[0, 2]] = W - box[[2, 0]]
    return box


def main(argv=None) -> int:
    args = parse_args(argv)
    if not osp.isfile(args.config):
        raise SystemExit(f'error: config not found: {args.config}')
    import numpy as np
    from mmengine.config import Config
    from tqdm import tqdm

    from gfl_det.data import DatasetError
    from gfl_det.data.validation import load_coco_json
    from gfl_det.mm import DATASETS
    from gfl_det.visualize import BAD_COLOR, color, draw_boxes, save_image
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        ds = DATASETS.build(cfg[f'{args.split}_dataloader'].dataset)
    except DatasetError as e:
        raise SystemExit(f'error: {e}')
    bad = BadBoxes(load_coco_json(ds.ann_file))
    names = list(ds.classes)
    cat_name = {c: n for c, n in zip(ds.cat_ids, names)}
    n = len(ds) if args.num <= 0 else min(args.num, len(ds))
    shown, undrawable = Counter(), []
    for i in tqdm(range(n), unit='img', dynamic_ncols=True, disable=n == 1):
        s = ds[i]
        meta = s['meta']
        img = np.ascontiguousarray(s['image'].permute(1, 2, 0).numpy())
        boxes, texts, colors = [], [], []
        for bbox, cat, reason in bad(int(meta['img_id'])):  # first: drawn on top, labelled first
            box = to_sample_coords(bbox, meta)
            shown[reason] += 1
            if box is None:
                undrawable.append(f'{meta["file_name"]}: bbox {bbox} ({reason})')
                continue
            boxes.append(box)
            texts.append(f'{cat_name.get(cat, f"category {cat}")} [{reason}]')
            colors.append(BAD_COLOR)
        dashed = [True] * len(boxes)
        labels = s['labels'].tolist()
        boxes += list(s['boxes'].numpy())
        texts += [names[k] for k in labels]
        colors += [color(k) for k in labels]
        dashed += [False] * len(labels)
        drawn, _ = draw_boxes(img, np.asarray(boxes, float).reshape(-1, 4), texts, colors, dashed=dashed)
        stem = osp.splitext(osp.basename(meta['file_name']))[0]
        save_image(osp.join(args.out_dir, f'{i:05d}_{stem}.jpg'), drawn)
    print(f'{n} image(s) of the {args.split} split ({ds.ann_file}) after the pipeline -> {args.out_dir}')
    if shown:
        print('annotations the dataset drops or clips, drawn dashed in magenta: '
              + ', '.join(f'{r} {k}' for r, k in shown.most_common()))
    for line in undrawable:
        print(f'  not drawable: {line}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
