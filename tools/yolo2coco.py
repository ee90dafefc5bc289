#!/usr/bin/env python
"""Convert YOLO txt labels (class cx cy w h, normalised) to one COCO instances JSON.

    python tools/yolo2coco.py data/mine/images/train --classes data/mine/data.yaml \
        --out data/mine/train.json

--classes: a data.yaml with names:, a classes.txt / obj.names (one per line), or a comma list.
Labels are read from the image folder with 'images' replaced by 'labels' unless --labels is
given. Problems (malformed lines, unknown classes, zero-size or outside boxes, orphan label
files) are listed by file:line; clipped boxes are counted. See gfl_det/data/yolo.py.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gfl_det.data.validation import DatasetError  # noqa: E402
from gfl_det.data.yolo import read_class_names, yolo_to_coco  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('img_dir')
    p.add_argument('--classes', required=True)
    p.add_argument('--labels', default=None, help='labels folder (default: guessed)')
    p.add_argument('--out', required=True)
    a = p.parse_args(argv)
    try:
        classes = (read_class_names(a.classes) if os.path.isfile(a.classes)
                   else [c for c in a.classes.split(',') if c])
        coco, rep = yolo_to_coco(a.img_dir, classes, a.labels)
    except DatasetError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, 'w') as f:
        json.dump(coco, f)
    for reason in ('malformed', 'unknown_class', 'degenerate', 'outside_image', 'orphan_label'):
        for where in rep[reason]:
            print(f'{reason}, not written: {where}', file=sys.stderr)
    print(f"{rep['num_images']} images ({rep['background']} without boxes), {rep['num_lines']} "
          f"label lines, wrote {rep['num_boxes']} boxes in {len(classes)} categories to {a.out}"
          f"; {len(rep['clipped'])} clipped")
    print(f'img_dir: {a.img_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
