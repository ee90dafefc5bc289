#!/usr/bin/env python
"""Detect objects in an image, a folder of images or a video and write them with the boxes drawn.

    python tools/demo.py demo.jpg configs/gfl_r50.py gfl_r50_fpn_1x_coco.pth --out-dir outputs
    python tools/demo.py data/synthetic/val configs/gfl_r18_synthetic.py \
        work_dirs/gfl_r18_synthetic/epoch_12.pth --score-thr 0.5
    python tools/demo.py traffic.mp4 configs/gfl_r50.py gfl_r50.pth --show-fps     # -> outputs/traffic.mp4
    python tools/demo.py data/synthetic/val --onnx gfl_r18.onnx                     # onnxruntime, no config
    python tools/demo.py data/synthetic_reid/val configs/gfl_r18_synthetic_reid.py \
        work_dirs/gfl_r18_synthetic_reid/epoch_12.pth --gallery gallery.pt            # who is who

Each picture keeps its input's name (PNG/JPEG as the input; other formats are written as PNG); a
video becomes ``OUT_DIR/<name>.mp4`` (mp4v). With ``--onnx`` the file exported by
tools/export_onnx.py runs in onnxruntime (CPU, or CUDA with ``--device cuda`` and
onnxruntime-gpu); class names and the resize come from the file. Folders and videos show a
progress bar with ETA; files in a folder that are not images, or do not decode (and subfolders),
are skipped, named and counted, and the run goes on. Every path is checked before a model loads.
A checkpoint is read with weights_only=True: one holding Python objects is refused (exit 2,
naming ``python -m gfl_det.checkpoint convert --trust``). ``--gallery G`` (a model with an
embedding branch; tools/gallery.py enroll) labels every detection with its nearest enrolled
identity and the distance, or ``unknown`` beyond the gallery's verification threshold.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from gfl_det.apis import IMAGE_EXTS, add_inference_args, parse_inference_args  # noqa: E402

VIDEO_EXTS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='GFL detection demo: draw boxes on images and videos')
    p.add_argument('inputs', help='an image, a folder of images, or a video file')
    p.add_argument('config', nargs='?', default=None, help='config file (not with --onnx)')
    p.add_argument('checkpoint', nargs='?', default=None,
                   help='checkpoint (gfl_det or MMDetection; not with --onnx)')
    p.add_argument('--onnx', default=None, metavar='FILE',
                   help='run this file from tools/export_onnx.py in onnxruntime instead of PyTorch')
    p.add_argument('--out-dir', default='outputs', help='where the pictures / videos go (default outputs/)')
    p.add_argument('--device', default=None, help="'cuda', 'cuda:1' or 'cpu' (default: cuda if "
                                                   'available)')
    p.add_argument('--score-thr', type=float, default=0.3, help='draw boxes scoring at least this')
    p.add_argument('--gallery', default=None, metavar='G',
                   help='a gallery from tools/gallery.py enroll: label each detection with its identity '
                        "and distance ('unknown' beyond the gallery's threshold)")
    p.add_argument('--show-fps', action='store_true',
                   help='write the detector\'s frames per second (smoothed) in the top-left corner')
    add_inference_args(p)
    p.add_argument('--trust-checkpoint', action='store_true', help=argparse.SUPPRESS)  # removed
    p.add_argument('--cfg-options', nargs='+', default=None, help='config overrides, key=value')
    args = parse_inference_args(p, argv)
    if args.onnx is None and (args.config is None or args.checkpoint is None):
        p.error('give CONFIG and CHECKPOINT, or --onnx FILE')
    if args.onnx is not None and args.config is not None:
        p.error('--onnx runs the exported file alone: leave out CONFIG and CHECKPOINT')
    if args.trust_checkpoint:
        from gfl_det.checkpoint import trust_flag_removed
        p.error(trust_flag_removed(args.checkpoint))
    return args


def check_paths(args) -> None:
    """Every input file exists -- checked before a model is loaded."""
    need = [(args.inputs, 'input')] + ([(args.gallery, 'gallery')] if args.gallery else [])
    if args.onnx:
        need.append((args.onnx, 'ONNX file'))
    else:
        need.append((args.config, 'config'))
        if '://' not in args.checkpoint:
            need.append((args.checkpoint, 'checkpoint'))
    for path, what in need:
        if not osp.exists(path):
            raise SystemExit(f'error: {what} not found: {path}')


def build_detector(args):
    """(detect(image_bgr) -> result dict with boxes in the image's pixels, class names)."""
    import torch
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if args.onnx:
        from gfl_det.export import OnnxDetector
        det = OnnxDetector(args.onnx, device=device)
        return det, det.class_names
    from mmengine.config import DictAction

    from gfl_det.apis import inference_detector, init_detector
    cfg_options = None
    if args.cfg_options:
        ns = argparse.Namespace()
        DictAction(option_strings=[], dest='o')(None, ns, args.cfg_options)
        cfg_options = ns.o
    model = init_detector(args.config, args.checkpoint, device=device, cfg_options=cfg_options,
                          fuse_conv_bn=args.fuse_conv_bn,
                          compile=args.compile, channels_last=args.channels_last, winograd=args.winograd,
                          cuda_graph=args.cuda_graph)
    return (lambda bgr: inference_detector(model, bgr, channel_order='bgr')), model.class_names


class FpsMeter:
    """Frames per second of the detector alone, smoothed (exponential average of frame times)."""

    def __init__(self):
        self.avg = None

    def add(self, seconds: float) -> float:
        self.avg = seconds if self.avg is None else 0.9 * self.avg + 0.1 * seconds
        return 1.0 / max(self.avg, 1e-9)


def identity_texts(res: dict, gallery) -> list[str] | None:
    """'name 0.42' (or 'unknown 1.10'): each detection's identity and distance from the gallery."""
    if gallery is None:
        return None
    if 'embeddings' not in res:
        raise SystemExit('error: --gallery needs a model with an embedding branch (model.bbox_head.embed); '
                         'this one outputs no embeddings')
    from gfl_det.gallery import GalleryError
    try:
        who, dist = gallery.identify(res['embeddings'])
    except GalleryError as e:
        raise SystemExit(f'error: --gallery: {e}')
    return [f'{w} {d:.2f}' for w, d in zip(who, dist)]


def annotate(bgr, detect, names, args, fps: FpsMeter | None = None, gallery=None):
    """(drawn RGB picture, detections kept) for one BGR frame."""
    import cv2

    from gfl_det.visualize import draw_detections
    t = time.perf_counter()
    res = detect(bgr)
    rate = fps.add(time.perf_counter() - t) if fps else None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    drawn = draw_detections(rgb, res, names, args.score_thr, texts=identity_texts(res, gallery))
    if rate is not None:
        text = f'{rate:.1f} fps'
        cv2.putText(drawn, text, (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(drawn, text, (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2, cv2.LINE_AA)
    return drawn, int((res['scores'] >= args.score_thr).sum())


def run_images(paths: list[str], detect, names, args, gallery=None) -> int:
    """Pictures for image files; undecodable or non-image files are skipped and listed."""
    import numpy as np
    from tqdm import tqdm

    from gfl_det.apis import read_images
    from gfl_det.visualize import save_image
    skipped, done = [], 0
    fps = FpsMeter() if args.show_fps else None
    bar = tqdm(paths, unit='img', disable=len(paths) == 1, dynamic_ncols=True)
    for path, rgb, problem in read_images(bar):
        if problem:
            skipped.append(f'{path} ({problem})')
            continue
        drawn, kept = annotate(np.ascontiguousarray(rgb[..., ::-1]), detect, names, args, fps, gallery)
        name = osp.basename(path)
        if not name.lower().endswith(('.png', '.jpg', '.jpeg')):
            name = osp.splitext(name)[0] + '.png'
        out = save_image(osp.join(args.out_dir, name), drawn)
        done += 1
        if len(paths) == 1:
            print(f'{path}: {kept} detection(s) >= {args.score_thr} -> {out}')
    if len(paths) > 1:
        print(f'{done} picture(s) written to {args.out_dir}')
    if skipped:
        print(f'skipped {len(skipped)} of {len(paths)} input(s):\n  ' + '\n  '.join(skipped), file=sys.stderr)
    return 0 if done else 1


def run_video(path: str, detect, names, args, gallery=None) -> int:
    """An annotated copy of a video (mp4v), frame by frame, with a progress bar."""
    import cv2
    from tqdm import tqdm
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise SystemExit(f'error: cannot open video {path} (cv2 has no decoder for it?)')
    fps_in = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    out_path = osp.join(args.out_dir, osp.splitext(osp.basename(path))[0] + '.mp4')
    os.makedirs(args.out_dir, exist_ok=True)
    writer, frames = None, 0
    fps = FpsMeter() if args.show_fps else None
    with tqdm(total=total, unit='frame', dynamic_ncols=True) as bar:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            drawn, _ = annotate(frame, detect, names, args, fps, gallery)
            if writer is None:
                h, w = drawn.shape[:2]
                writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*'mp4v'), fps_in, (w, h))
                if not writer.isOpened():
                    raise SystemExit(f'error: cannot write {out_path} (no mp4v encoder in this cv2 build)')
            writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            frames += 1
            bar.update(1)
    cap.release()
    if writer is None:
        raise SystemExit(f'error: no frame could be read from {path}')
    writer.release()
    print(f'{path}: {frames} frame(s) -> {out_path}')
    return 0


def list_inputs(path: str) -> list[str]:
    if osp.isdir(path):
        files = sorted(osp.join(path, f) for f in os.listdir(path) if not f.startswith('.'))
        if not files:
            raise SystemExit(f'error: no files in {path}')
        return files
    return [path]


def main(argv=None) -> int:
    args = parse_args(argv)
    check_paths(args)
    if osp.isfile(args.inputs) and not args.inputs.lower().endswith(IMAGE_EXTS + VIDEO_EXTS):
        raise SystemExit(f'error: {args.inputs} is neither an image ({", ".join(IMAGE_EXTS)}) nor a '
                         f'video ({", ".join(VIDEO_EXTS)})')
    inputs = list_inputs(args.inputs)
    from gfl_det.fast.malloc import retain_freed_memory
    retain_freed_memory()  # freed activations stay mapped (gfl_det/fast/malloc.py; GFL_DET_MALLOC=system to opt out)
    gallery = None
    if args.gallery:
        from gfl_det.gallery import Gallery, GalleryError
        try:
            gallery = Gallery.load(args.gallery)
        except GalleryError as e:
            raise SystemExit(f'error: {e}')
        print(f'gallery {args.gallery}: {gallery.describe()}')
    from gfl_det.checkpoint import CheckpointError
    try:
        detect, names = build_detector(args)
    except CheckpointError as e:  # refused (holds Python objects), corrupt or does not fit
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.inputs.lower().endswith(VIDEO_EXTS) and osp.isfile(args.inputs):
        return run_video(args.inputs, detect, names, args, gallery)
    return run_images(inputs, detect, names, args, gallery)


if __name__ == '__main__':
    sys.exit(main())
