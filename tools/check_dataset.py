#!/usr/bin/env python
"""Report every problem of a COCO-format dataset in one pass.

    python tools/check_dataset.py data/coco/annotations/instances_val2017.json data/coco/val2017

Checks the JSON (structure, ids, categories, every box: NaN, zero/negative size, outside,
mostly outside or crossing the image, unknown image/category (named with its id), no usable box
at all) and every image file (missing, undecodable, truncated, size different from the JSON).
Prints counts per problem with file names; images with more than 100 boxes get an info line.
These are the rules training and evaluation apply (gfl_det.data.groundtruth): what is reported
as left out here is neither trained on nor scored.
Exit status: 0 no errors (warnings/info may be listed), 1 errors found, 2 unusable JSON.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gfl_det.data.groundtruth import check_dataset  # noqa: E402
from gfl_det.data.validation import DatasetError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('ann_file', help='COCO instances JSON')
    p.add_argument('img_dir', help='folder the JSON file names are relative to')
    p.add_argument('--level', default='decode', choices=['exists', 'header', 'decode'],
                   help='how far image files are checked (default: full decode)')
    p.add_argument('--workers', type=int, default=2, help='threads checking images')
    p.add_argument('--max-files', type=int, default=10, help='file names shown per problem')
    p.add_argument('--json', default=None, help='also write the full report (all file names)')
    a = p.parse_args(argv)
    try:
        res = check_dataset(a.ann_file, a.img_dir, level=a.level, workers=a.workers)
    except DatasetError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    rep = res['report']
    print(f"{a.ann_file}: {res['num_images']} images, {res['num_boxes']} usable boxes "
          f"(+{res['num_crowd']} crowd) of {res['num_annotations']} annotations, "
          f"{len(res['classes'])} classes")
    for line in rep.lines(max_files=a.max_files):
        print(line)
    if a.json:
        with open(a.json, 'w') as f:
            json.dump({k: v for k, v in res.items() if k != 'report'}
                      | {'problems': rep.to_dict()}, f, indent=1)
    n_err = sum(rep.errors.values())
    print(f'{n_err} error(s), {sum(rep.warnings.values())} warning(s)'
          + ('' if n_err else ': OK'))
    return 1 if n_err else 0


if __name__ == '__main__':
    sys.exit(main())
