#!/usr/bin/env python
"""What the embedding branch costs: a training step (forward, all losses, backward, SGD update) of
a config's model with its ``bbox_head.embed`` and without it, timed in the same run, interleaved
(A, B, A, B, ...) so that the machine's load falls on both alike.

    python tools/embed_benchmark.py configs/gfl_r18_synthetic_reid.py --batch 8 --shape 320 384
    python tools/embed_benchmark.py configs/gfl_r18_synthetic_reid.py --task infer --batch 1

Random images and boxes (``--num-gt`` per image, each its own identity, with repeats across the
batch so that the metric loss has positives), random weights. Prints the median and min seconds
per step of both, and the ratio with / without (``--json``: one line).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gfl_det.models import build_detector  # noqa: E402
from gfl_det.structures import Targets  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='a config whose model has bbox_head.embed')
    p.add_argument('--task', choices=['train', 'infer'], default='train',
                   help='train: one SGD step; infer: forward + post-processing (default train)')
    p.add_argument('--batch', type=int, default=8, help='images per step (default 8, the synthetic job\'s)')
    p.add_argument('--shape', type=int, nargs=2, default=(320, 384), metavar=('H', 'W'), help='input size (320 384)')
    p.add_argument('--num-gt', type=int, default=3, help='boxes per image (default 3)')
    p.add_argument('--iters', type=int, default=10, help='timed steps of each model (default 10)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps of each first (default 2)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda'")
    p.add_argument('--json', action='store_true', help='print one JSON line')
    from mmengine.config import DictAction
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='config overrides, e.g. '
                   'model.bbox_head.embed.feat_channels=32')
    return p.parse_args(argv)


def models(config: str, device: str, options: dict | None = None):
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(options or {})
    cfg = cfg.model.to_dict()
    cfg.pop('data_preprocessor', None)
    cfg['backbone'] = dict(cfg['backbone'], init_cfg=None)
    if not cfg['bbox_head'].get('embed'):
        raise SystemExit(f'error: {config} has no model.bbox_head.embed to measure')
    plain = dict(cfg, bbox_head={k: v for k, v in cfg['bbox_head'].items() if k != 'embed'})
    out = {}
    for name, c in (('without', plain), ('with', cfg)):
        torch.manual_seed(0)
        out[name] = build_detector(c).to(device)
    return out


def random_batch(B: int, H: int, W: int, G: int, num_classes: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, H, W, generator=g)
    xy = torch.rand(B, G, 2, generator=g) * torch.tensor([W * 0.7, H * 0.7])
    wh = 24 + torch.rand(B, G, 2, generator=g) * torch.tensor([W * 0.3, H * 0.3])
    boxes = torch.cat([xy, xy + wh], -1)
    ids = torch.randint(0, max(2, B * G // 2), (B, G), generator=g)  # about two of each identity
    targets = Targets(boxes, torch.randint(0, num_classes, (B, G), generator=g), torch.ones(B, G, dtype=torch.bool), ids)
    metas = [dict(img_shape=(H, W), pad_shape=(H, W), scale_factor=(1.0, 1.0))] * B
    return x.to(device), targets.to(device), metas


def step(model, opt, x, targets, metas, task: str) -> None:
    if task == 'infer':
        with torch.no_grad():
            model.predict(x, metas)
        return
    losses = model.loss(x, targets, metas)
    opt.zero_grad(set_to_none=True)
    sum(v for k, v in losses.items() if k.startswith('loss')).backward()
    opt.step()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    nets = models(args.config, args.device, args.cfg_options)
    x, targets, metas = random_batch(args.batch, *args.shape, args.num_gt, nets['with'].num_classes, args.device)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in nets.items()}
    for m in nets.values():
        m.train(args.task == 'train')
    times = {k: [] for k in nets}
    for i in range(args.warmup + args.iters):
        for k, m in nets.items():
            if args.device.startswith('cuda'):
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(m, opts[k], x, targets, metas, args.task)
            if args.device.startswith('cuda'):
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t)
    res = {k: dict(median_s=statistics.median(v), min_s=min(v)) for k, v in times.items()}
    res['ratio_median'] = res['with']['median_s'] / res['without']['median_s']
    res['ratio_min'] = res['with']['min_s'] / res['without']['min_s']
    res.update(task=args.task, batch=args.batch, shape=list(args.shape), threads=torch.get_num_threads(),
               device=args.device, iters=args.iters)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.task}, {args.batch} x {args.shape[0]}x{args.shape[1]}, {torch.get_num_threads()} threads, "
              f"{args.iters} interleaved steps each:")
        for k in ('without', 'with'):
            print(f"  {k:8s} the branch: median {res[k]['median_s']:.4f} s  min {res[k]['min_s']:.4f} s")
        print(f"  with / without: {res['ratio_median']:.3f} (median), {res['ratio_min']:.3f} (min)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
