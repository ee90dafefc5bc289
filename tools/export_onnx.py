#!/usr/bin/env python
"""Export a GFL checkpoint to ONNX, pre- and post-processing inside the graph (gfl_det/export.py).

    python tools/export_onnx.py configs/gfl_r18_synthetic.py work_dirs/gfl_r18_synthetic/epoch_12.pth \
        --out gfl_r18.onnx --dynamic --with-nms --verify data/synthetic/val/val_00000.jpg

The graph takes a uint8 BGR batch (B, H, W, 3) already resized (static: exactly --shape;
--dynamic: the config's keep-ratio test Resize) and returns ``boxes`` (N, 4) xyxy in input pixels,
``scores``, ``labels`` and ``batch_index``. --verify runs the file in onnxruntime beside the
PyTorch model on the given images (files or folders) and prints one JSON line; the tool exits
with status 1 when they disagree beyond the stated tolerances (README, Deploy).
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', nargs='?', default=None,
                   help='checkpoint (gfl_det or MMDetection); omitted: random weights (for timing)')
    p.add_argument('--out', required=True, help='the .onnx file to write')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), default=None,
                   help='input height and width: the static input size, or the traced one with --dynamic '
                        '(default: the config\'s test Resize scale, e.g. 800 1333)')
    p.add_argument('--dynamic', action='store_true', help='dynamic batch, height and width')
    p.add_argument('--with-nms', action='store_true',
                   help='class-aware NMS and max_per_img inside the graph (default: the runtime does them)')
    p.add_argument('--fp16', action='store_true',
                   help='backbone, neck and head in float16 (pre/post-processing in float32)')
    p.add_argument('--no-simplify', action='store_true', help='skip onnxslim even where it is installed')
    p.add_argument('--verify', nargs='+', metavar='IMAGE', default=None,
                   help='compare onnxruntime with PyTorch on these images (files or folders)')
    p.add_argument('--trust-checkpoint', action='store_true', help=argparse.SUPPRESS)  # removed
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                   help='config overrides, key=value (e.g. model.backbone.init_cfg=None)')
    args = p.parse_args(argv)
    if args.trust_checkpoint:
        from gfl_det.checkpoint import trust_flag_removed
        p.error(trust_flag_removed(args.checkpoint))
    return args


def expand_images(paths: list[str]) -> list[str]:
    """Image files, folders expanded to their images (sorted); a missing path is an error."""
    out = []
    for p in paths:
        if osp.isdir(p):
            out += sorted(osp.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS))
        elif osp.isfile(p):
            out.append(p)
        else:
            raise SystemExit(f'error: --verify: no such file or folder: {p}')
    if not out:
        raise SystemExit(f'error: --verify: no images in {" ".join(paths)}')
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, what in ((args.config, 'config'), (args.checkpoint, 'checkpoint')):
        if path is not None and '://' not in path and not osp.isfile(path):
            raise SystemExit(f'error: {what} not found: {path}')
    images = expand_images(args.verify) if args.verify else []
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise SystemExit(f'error: {e.name} is not installed: pip install -e ".[export]" '
                         '(or pip install onnx onnxruntime)')
    from gfl_det.apis import init_detector
    from gfl_det.export import export_onnx, verify_onnx
    from gfl_det.fast.malloc import retain_freed_memory
    retain_freed_memory()  # as every tool: PyTorch's side of --verify runs as in tools/test.py
    model = init_detector(args.config, args.checkpoint, device='cpu', cfg_options=args.cfg_options)
    if args.checkpoint is None:
        print('note: no checkpoint given: the exported weights are random', file=sys.stderr)
    info = export_onnx(model, args.out, shape=args.shape, dynamic=args.dynamic, with_nms=args.with_nms,
                       fp16=args.fp16, simplify=not args.no_simplify)
    shape = 'B, H, W' if args.dynamic else f'1, {info["static_shape"][0]}, {info["static_shape"][1]}'
    print(f'wrote {args.out} ({info["size_mb"]:.1f} MB, opset {info["opset"]}, '
          f'{"onnxslim-simplified" if info["simplified"] else "not simplified"}): input images uint8 '
          f'({shape}, 3) BGR; outputs {", ".join(info["outputs"])}; '
          f'{"NMS inside" if args.with_nms else "NMS left to the runtime"}'
          f'{"; fp16 network" if args.fp16 else ""}')
    if not images:
        return 0
    res = verify_onnx(args.out, model, images)
    print(json.dumps(res))
    if not res['ok']:
        print(f'error: VERIFY FAILED: onnxruntime and PyTorch disagree beyond the tolerance '
              f'{res["tolerance"]}: max_box_diff {res["max_box_diff"]:.4g} px, max_score_diff '
              f'{res["max_score_diff"]:.4g}, labels_equal {res["labels_equal"]}, detections '
              f'{res["num_dets"]}, unmatched {res["unmatched"]}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
