#!/usr/bin/env python
"""Detect objects in an image or a folder of images and write pictures with the boxes drawn.

    python tools/demo.py demo.jpg configs/gfl_r50.py gfl_r50_fpn_1x_coco.pth --out-dir outputs
    python tools/demo.py data/synthetic/val configs/gfl_r18_synthetic.py \
        work_dirs/gfl_r18_synthetic/epoch_12.pth --score-thr 0.5

Each output keeps the input's name (PNG/JPEG as the input; other formats are written as PNG).
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from gfl_det.apis import add_inference_args, parse_inference_args  # noqa: E402

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='GFL detection demo: draw boxes on images')
    p.add_argument('inputs', help='an image file or a folder of images')
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', help='checkpoint (gfl_det or MMDetection)')
    p.add_argument('--out-dir', default='outputs', help='where the pictures go (default outputs/)')
    p.add_argument('--device', default=None, help="'cuda', 'cuda:1' or 'cpu' (default: cuda if "
                                                   'available)')
    p.add_argument('--score-thr', type=float, default=0.3, help='draw boxes scoring at least this')
    add_inference_args(p)
    p.add_argument('--trust-checkpoint', action='store_true',
                   help='the checkpoint is a full training checkpoint from a source you trust '
                        '(unpickled with weights_only=False)')
    p.add_argument('--cfg-options', nargs='+', default=None, help='config overrides, key=value')
    return parse_inference_args(p, argv)


def list_images(path: str) -> list[str]:
    if osp.isdir(path):
        files = sorted(osp.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise SystemExit(f'no images ({", ".join(IMAGE_EXTS)}) in {path}')
        return files
    if not osp.isfile(path):
        raise SystemExit(f'no such file or folder: {path}')
    return [path]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from mmengine.config import DictAction  # noqa: F401  (parses like train.py's)

    from gfl_det.apis import inference_detector, init_detector
    from gfl_det.visualize import draw_detections, save_image
    from gfl_det.data import load_image
    from gfl_det.malloc import retain_freed_memory
    retain_freed_memory()  # freed activations stay mapped (gfl_det/malloc.py; GFL_DET_MALLOC=system to opt out)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    cfg_options = None
    if args.cfg_options:
        ns = argparse.Namespace()
        DictAction(option_strings=[], dest='o')(None, ns, args.cfg_options)
        cfg_options = ns.o
    model = init_detector(args.config, args.checkpoint, device=device, cfg_options=cfg_options,
                          trusted=args.trust_checkpoint, fuse_conv_bn=args.fuse_conv_bn,
                          compile=args.compile, channels_last=args.channels_last, winograd=args.winograd)
    for path in list_images(args.inputs):
        img = load_image(path)
        res = inference_detector(model, img, channel_order='rgb')
        drawn = draw_detections(img, res, model.class_names, args.score_thr)
        name = osp.basename(path)
        if not name.lower().endswith(('.png', '.jpg', '.jpeg')):
            name = osp.splitext(name)[0] + '.png'
        out = save_image(osp.join(args.out_dir, name), drawn)
        kept = int((res['scores'] >= args.score_thr).sum())
        print(f'{path}: {kept} detection(s) >= {args.score_thr} -> {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
