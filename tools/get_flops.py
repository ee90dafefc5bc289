#!/usr/bin/env python
"""FLOPs of the detector's forward (backbone + neck + head) with torch's flop counter.

    python tools/get_flops.py configs/gfl_r50.py [--shape 800 1216] [--train] [--json]

Without --shape the input is the config's test Resize scale, padded to a multiple of 32 as the
network sees it: (1333, 800) -> 800 x 1344 (the largest landscape input of its test pipeline).

FLOPs here count a multiply-add as 2 (torch.utils.flop_counter), so they are ~2x the "GMACs"
some tools print. ``--train`` also counts one training step (forward, loss and backward of one
image with 10 random boxes): the backward computes only the gradients that exist (no input
gradient for the image, none at all through a frozen stem), so it is less than 2x the forward.
With a measured time t for a batch of B images, MFU = B * flops_per_image / t / peak_flops.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gfl_det.models import build_detector  # noqa: E402


def count_flops(model, shape) -> tuple[int, dict]:
    x = torch.zeros(1, 3, *shape)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    per_module = {k: v for k, v in fc.get_flop_counts().items() if k.count(".") == 1}
    return fc.get_total_flops(), {k: sum(v.values()) for k, v in per_module.items()}


def count_train_flops(model, shape, num_gt: int = 10, seed: int = 0) -> tuple[int, dict]:
    """FLOPs of one training step on one image (forward + loss + backward), and per operator."""
    from benchmark import random_gt  # tools/benchmark.py: the boxes it times the loss with

    g = torch.Generator().manual_seed(seed)
    H, W = shape
    targets = random_gt(g, 1, num_gt, H, W, model.num_classes)
    meta = dict(img_shape=(H, W), pad_shape=(H, W), batch_input_shape=(H, W), ori_shape=(H, W),
                scale_factor=(1.0, 1.0))
    x = torch.randn(1, 3, H, W, generator=g)
    model.train()
    with FlopCounterMode(display=False) as fc:
        losses = model.loss(x, targets, [meta])
        sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops(), {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


def main(argv=None):
    from mmengine.config import Config
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file")
    p.add_argument("--shape", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input height and width (default: the config's test Resize scale, padded to 32)")
    p.add_argument("--train", action="store_true", help="also count one training step (1 image, 10 boxes)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    full_cfg = Config.fromfile(args.config)
    if args.shape is None:
        from gfl_det.export import test_input_shape
        args.shape = test_input_shape(full_cfg)
    cfg = full_cfg.model.to_dict()
    cfg.get("backbone", {}).pop("init_cfg", None)
    model = build_detector(cfg)
    total, parts = count_flops(model, args.shape)
    params = sum(p.numel() for p in model.parameters())
    res = dict(config=args.config, shape=list(args.shape), gflops=total / 1e9, params_m=params / 1e6,
               parts_gflops={k: v / 1e9 for k, v in parts.items() if v})
    if args.train:
        res["train_step_gflops"] = count_train_flops(model, args.shape)[0] / 1e9
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.config} @ {args.shape[0]}x{args.shape[1]}: {total / 1e9:.1f} GFLOPs (forward, 1 image; "
              f"1 multiply-add = 2 FLOPs), {params / 1e6:.2f} M parameters")
        for k, v in res["parts_gflops"].items():
            print(f"  {k:<20} {v:8.1f} GFLOPs")
        if args.train:
            print(f"training step, 1 image (forward + loss + backward): {res['train_step_gflops']:.1f} GFLOPs")


if __name__ == "__main__":
    main()
