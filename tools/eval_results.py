#!/usr/bin/env python
"""Evaluate an existing COCO results JSON against an annotation file (no model needed).

    python tools/eval_results.py ANN RESULTS [--classwise] [--json]

Prints COCOeval's 12 numbers (and the per-class AP table with --classwise). With --json it
prints exactly one JSON line instead: {"stats": [12 numbers in COCOeval.stats order],
"metrics": {name: value}, "num_images", "num_detections", and "classwise" with --classwise}.
Evaluation covers every image of the annotation file (the official protocol).
Exit status: 0 ok, 2 bad arguments / unreadable or malformed files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

try:
    from gfl_det.evaluation import METRIC_NAMES, coco_evaluate
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gfl_det.evaluation import METRIC_NAMES, coco_evaluate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('ann', help='COCO annotation JSON (instances_*.json)')
    p.add_argument('results', help='COCO results JSON: [{image_id, category_id, bbox, score}]')
    p.add_argument('--classwise', action='store_true', help='per-class AP table')
    p.add_argument('--json', action='store_true', help='print one JSON line only')
    return p.parse_args(argv)


def _nan_to_none(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        res = coco_evaluate(args.ann, args.results, classwise=args.classwise)
    except (FileNotFoundError, ValueError) as e:
        print(f'eval_results: error: {e}', file=sys.stderr)
        return 2
    if args.json:
        out = {'stats': res['stats'],
               'metrics': {k: res[k] for k in METRIC_NAMES},
               'num_images': res['num_images'],
               'num_detections': res['num_detections']}
        if args.classwise:
            out['classwise'] = [{k: _nan_to_none(v) for k, v in r.items()}
                                for r in res['classwise']]
        print(json.dumps(out))  # NaN never appears: stats are -1 where undefined
        return 0
    print(f'{res["num_images"]} images, {res["num_detections"]} detections')
    print(res['summary'])
    if args.classwise:
        print()
        print(res['classwise_table'])
    print()
    for name, v in zip(METRIC_NAMES, res['stats']):
        print(f'{name:>14s} {v:.4f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
