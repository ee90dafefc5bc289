#!/usr/bin/env python
"""Images/s of the data loader alone (decode + augment + collate), no model.

    python tools/loader_speed.py                  # coco128, 1333x800, 0 and 2 workers
    python tools/loader_speed.py --ann A.json --img-dir DIR --workers 0 4 --scale 1333 800

Default data: ../shared/datasets/coco128 (the first 128 COCO train2017 images). The training
pipeline is used (keep-ratio resize, flip 0.5; --ms for mmdet's 480-960 multi-scale,
--photometric for colour jitter). The first batch (worker start-up) is not timed; then
--epochs passes over the dataset are. Compare the result with the model's training speed
(imgs/s = batch / s per iter): the loader must be clearly faster.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gfl_det.data import CocoDataset, build_dataloader  # noqa: E402

COCO128 = Path(__file__).resolve().parents[2] / 'shared' / 'datasets' / 'coco128'


def measure(ds, workers, batch_size, epochs, pin_memory):
    loader = build_dataloader(ds, batch_size=batch_size, num_workers=workers, seed=0,
                              pin_memory=pin_memory, persistent_workers=True)
    it = iter(loader)
    next(it)                                           # start-up: not timed
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += b['inputs'].shape[0]
    for _ in range(epochs - 1):
        for b in loader:
            n += b['inputs'].shape[0]
    dt = time.perf_counter() - t0
    return n / dt, n, dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--ann', default=str(COCO128 / 'annotations' / 'instances_coco128.json'))
    p.add_argument('--img-dir', default=str(COCO128 / 'images'))
    p.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--scale', type=int, nargs=2, default=[1333, 800], metavar=('LONG', 'SHORT'))
    p.add_argument('--ms', action='store_true', help='multi-scale 1333x[480, 960]')
    p.add_argument('--photometric', action='store_true')
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--pin-memory', action='store_true', default=torch.cuda.is_available())
    p.add_argument('--threads', type=int, default=1, help='torch threads in the main process')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tf = dict(scale=tuple(a.scale), flip_prob=0.5, photometric=a.photometric,
              ms_range=[(1333, 480), (1333, 960)] if a.ms else None)
    ds = CocoDataset(a.ann, a.img_dir, tf)
    for w in a.workers:
        ips, n, dt = measure(ds, w, a.batch_size, a.epochs, a.pin_memory)
        print(json.dumps({'workers': w, 'imgs_per_s': round(ips, 1), 'images': n,
                          'seconds': round(dt, 2), 'batch_size': a.batch_size,
                          'scale': a.scale, 'ms': a.ms, 'photometric': a.photometric,
                          'pin_memory': a.pin_memory, 'dataset': Path(a.ann).name,
                          'len': len(ds)}))


if __name__ == '__main__':
    main()
