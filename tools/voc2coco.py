#!/usr/bin/env python
"""Convert a Pascal VOC dataset (XML boxes) to one COCO instances JSON.

    python tools/voc2coco.py ../shared/datasets/bccd --out data/bccd/trainval.json --split trainval
    python tools/voc2coco.py ../shared/datasets/bccd --out data/bccd/test.json --split test

VOC_ROOT holds Annotations/ JPEGImages/ ImageSets/Main/ (or has one sub-folder that does).
``--split`` takes split names of ImageSets/Main, comma separated, or ``all`` (default: every XML).
The JSON's file names are relative to VOC_ROOT/.../JPEGImages (printed at the end: use it as
the dataset's img_dir).

Rules (see gfl_det/data/voc.py): coordinates 1-based -> 0-based as MMDetection's converter,
``difficult`` -> ``iscrowd=1``; boxes of zero or negative size are NOT written and are listed
here by file name; boxes crossing the image border are clipped and counted.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gfl_det.data.validation import DatasetError  # noqa: E402
from gfl_det.data.voc import voc_to_coco  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('voc_root', help='VOC folder (with Annotations/ JPEGImages/ ImageSets/)')
    p.add_argument('--out', required=True, help='COCO JSON to write')
    p.add_argument('--split', default='all',
                   help="ImageSets/Main split(s), comma separated, or 'all' (default)")
    p.add_argument('--classes', default=None,
                   help='comma separated class names in label order (default: sorted names)')
    p.add_argument('--no-check-images', action='store_true',
                   help='do not open the images (trust the XML sizes)')
    a = p.parse_args(argv)
    try:
        coco, rep = voc_to_coco(a.voc_root, a.split,
                                classes=a.classes.split(',') if a.classes else None,
                                check_images=not a.no_check_images)
    except DatasetError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, 'w') as f:
        json.dump(coco, f)
    for xml, cls, box in rep['degenerate']:
        print(f'degenerate box (zero or negative size), not written: {xml} {cls} '
              f'xmin,ymin,xmax,ymax={box}', file=sys.stderr)
    for xml, cls in rep['unknown_class']:
        print(f'unknown class, not written: {xml} {cls!r}', file=sys.stderr)
    if rep['clipped']:
        print(f"{len(rep['clipped'])} boxes crossed the image border and were clipped "
              f"(first: {rep['clipped'][0][0]})", file=sys.stderr)
    print(f"{rep['num_images']} images, {rep['num_objects']} boxes read in "
          f"{len(coco['categories'])} categories "
          f"({', '.join(c['name'] for c in coco['categories'])})"
          f"; wrote {rep['num_boxes']} boxes {rep['class_counts']} to {out}; "
          f"skipped {len(rep['degenerate'])} degenerate, {len(rep['unknown_class'])} unknown-class;"
          f" {rep['difficult']} difficult (iscrowd=1)")
    print(f"img_dir: {os.path.relpath(rep['img_dir'])}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
