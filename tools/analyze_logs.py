#!/usr/bin/env python
"""Training curves from a work dir's logged scalars (MMDetection's tool name and flags).

    python tools/analyze_logs.py plot_curve work_dirs/gfl_r18_synthetic \
        --keys loss loss_cls bbox_mAP --out curves.png
    python tools/analyze_logs.py plot_curve run_a/ run_b/20261128_101500/vis_data/scalars.json \
        --keys bbox_mAP --legend a b --out compare.png

Each LOG is a work dir (its newest ``<timestamp>/vis_data/scalars.json``, mmengine's JSON lines)
or such a json file. Training scalars (loss, loss_cls, lr, grad_norm, ...) are drawn against
the iteration, validation metrics against the epoch; metrics may be named short (``bbox_mAP``
for ``coco/bbox_mAP``). A key that is not logged is an error listing the keys that are.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='task', required=True)
    c = sub.add_parser('plot_curve', help='plot scalars of one or more runs to a PNG')
    c.add_argument('json_logs', nargs='+', metavar='LOG', help='work dir or vis_data/scalars.json')
    c.add_argument('--keys', nargs='+', default=['loss'],
                   help='scalars to plot, one panel each (default: loss), e.g. loss loss_cls bbox_mAP')
    c.add_argument('--legend', nargs='+', default=None, help='one name per LOG (default: run 1, run 2, ...)')
    c.add_argument('--title', default=None, help='figure title')
    c.add_argument('--out', default='curves.png', help='the PNG to write (default curves.png)')
    args = p.parse_args(argv)
    if args.legend and len(args.legend) != len(args.json_logs):
        p.error(f'--legend has {len(args.legend)} names for {len(args.json_logs)} logs')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from gfl_det.plots import find_scalars, plot_curves, read_scalars
    try:
        paths = [find_scalars(p) for p in args.json_logs]
        runs = [read_scalars(p) for p in paths]
        out = plot_curves(runs, args.keys, args.out, legend=args.legend, title=args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyError as e:
        print(f'error: {e.args[0]}', file=sys.stderr)
        return 2
    print(f'read {", ".join(paths)}; wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
