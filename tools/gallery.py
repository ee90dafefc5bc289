#!/usr/bin/env python
"""Build a gallery for one-shot recognition from one (or a few) examples per identity.

    python tools/gallery.py enroll CONFIG CHECKPOINT --folder people/ --out gallery.pt
    python tools/gallery.py enroll configs/gfl_r18_synthetic_reid.py work_dirs/gfl_r18_synthetic_reid/epoch_12.pth \
        --coco data/synthetic_reid/annotations/instances_val.json --img-dir data/synthetic_reid/val --out gallery.pt
    python tools/gallery.py show gallery.pt
    python tools/demo.py IMAGES CONFIG CHECKPOINT --gallery gallery.pt     # names every detection

Examples:

* ``--folder DIR``: a subfolder per identity (its name is the identity's name) holding its images,
  or image files named by identity (``DIR/alice.jpg``). Each image shows the object: its
  best-scoring detection (>= ``--score-thr``) is the example.
* ``--coco ANN --img-dir DIR``: a COCO json whose annotations have an ``instance_id``; the
  example is the detection matching the annotation's box (IoU >= 0.5, best score).

Per identity ``--per-identity`` examples (a seeded random choice) are enrolled; the others are held
out to choose the verification threshold (``gfl_det.gallery.choose_threshold``), which is stored in
the gallery: beyond it ``demo.py`` says ``unknown``. Without held-out examples give
``--threshold``. An example whose image has no (matching) detection is skipped, named and counted;
an identity without any enrolled example is left out; a gallery that would be empty is an error.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from gfl_det.apis import IMAGE_EXTS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='One-shot recognition gallery: enroll identities, show a gallery')
    sub = p.add_subparsers(dest='command', required=True)
    e = sub.add_parser('enroll', help='build a gallery file from examples')
    e.add_argument('config', help='config of a model with an embedding branch (bbox_head.embed)')
    e.add_argument('checkpoint', help='its checkpoint')
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument('--folder', help='a subfolder per identity, or image files named by identity')
    src.add_argument('--coco', metavar='ANN', help="a COCO json whose annotations have an 'instance_id'")
    e.add_argument('--img-dir', help='--coco: the folder its file_name entries are relative to')
    e.add_argument('--out', required=True, help='the gallery file to write (e.g. gallery.pt)')
    e.add_argument('--per-identity', type=int, default=1, help='examples enrolled per identity (default 1: '
                                                              'one-shot); the rest choose the threshold')
    e.add_argument('--max-held', type=int, default=10, help='held-out examples used per identity (default 10)')
    e.add_argument('--threshold', type=float, default=None,
                   help='the verification threshold to store, instead of choosing one on held-out examples')
    e.add_argument('--score-thr', type=float, default=0.3, help='--folder: the example detection scores at least this')
    e.add_argument('--seed', type=int, default=0, help='seed of the choice of enrolled examples (default 0)')
    e.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda'")
    s = sub.add_parser('show', help='print what a gallery holds')
    s.add_argument('gallery')
    args = p.parse_args(argv)
    if args.command == 'enroll' and args.coco and not args.img_dir:
        p.error('--coco needs --img-dir')
    if args.command == 'enroll' and args.per_identity < 1:
        p.error('--per-identity must be >= 1')
    return args


def folder_examples(folder: str) -> tuple[list[str], list[list], list[str]]:
    """(names, per identity its [(image path, None)], skipped files)."""
    if not osp.isdir(folder):
        raise SystemExit(f'error: --folder {folder} is not a folder')
    groups: dict[str, list] = {}
    skipped = []
    for entry in sorted(os.listdir(folder)):
        path = osp.join(folder, entry)
        if entry.startswith('.'):
            continue
        if osp.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
            skipped += [osp.join(path, f) for f in sorted(os.listdir(path))
                        if not f.lower().endswith(IMAGE_EXTS) and not f.startswith('.')]
            if files:
                groups.setdefault(entry, []).extend((osp.join(path, f), None) for f in files)
        elif entry.lower().endswith(IMAGE_EXTS):
            groups.setdefault(osp.splitext(entry)[0], []).append((path, None))
        else:
            skipped.append(path)
    names = sorted(groups)
    return names, [groups[n] for n in names], [f'{s} (not an image file)' for s in skipped]


def coco_examples(ann: str, img_dir: str) -> tuple[list[str], list[list], list[str]]:
    """(names = the instance ids, per identity its [(image path, gt box xyxy)], [])."""
    from gfl_det.data.identity import annotation_identities
    from gfl_det.data.validation import load_coco_json
    data = load_coco_json(ann)
    id_of, names = annotation_identities(data, 'instance_id', ann)
    files = {im['id']: osp.join(img_dir, im['file_name']) for im in data['images']}
    groups: list[list] = [[] for _ in names]
    for a in data['annotations']:
        if a.get('iscrowd', 0) or a['id'] not in id_of or a['image_id'] not in files:
            continue
        x, y, w, h = a['bbox']
        groups[id_of[a['id']]].append((files[a['image_id']], (x, y, x + w, y + h)))
    return [str(n) for n in names], groups, []


class Embedder:
    """The example's embedding from the detector, each image run once."""

    def __init__(self, model, score_thr: float):
        self.model, self.score_thr, self.cache = model, score_thr, {}

    def __call__(self, path: str, box):
        import numpy as np
        import torch
        from torchvision.ops import box_iou

        from gfl_det.apis import inference_detector
        from gfl_det.data import BadImageError
        if path not in self.cache:
            try:
                self.cache[path] = inference_detector(self.model, path)
            except BadImageError as e:
                self.cache[path] = e.reason.replace('_', ' ')
        res = self.cache[path]
        if isinstance(res, str):
            return res
        if 'embeddings' not in res:
            raise SystemExit('error: the model has no embedding branch (model.bbox_head.embed): it cannot enroll')
        if box is None:
            ok = np.flatnonzero(res['scores'] >= self.score_thr)
            return res['embeddings'][ok[0]] if len(ok) else f'no detection scoring >= {self.score_thr}'
        iou = box_iou(torch.as_tensor(res['bboxes']), torch.tensor([box], dtype=torch.float32))[:, 0].numpy()
        ok = np.flatnonzero(iou >= 0.5)  # detections are best-first: the first is the best score
        return res['embeddings'][ok[0]] if len(ok) else 'no detection matching the box (IoU >= 0.5)'


def enroll(args) -> int:
    import numpy as np
    import torch

    from gfl_det.apis import init_detector
    from gfl_det.gallery import Gallery, GalleryError, choose_threshold, split_examples
    for path, what in ((args.config, 'config'), (args.checkpoint, 'checkpoint'), (args.coco, 'COCO json')):
        if path and not osp.exists(path):
            raise SystemExit(f'error: {what} not found: {path}')
    names, groups, skipped = (folder_examples(args.folder) if args.folder else coco_examples(args.coco, args.img_dir))
    if not names:
        raise SystemExit(f'error: no example found in {args.folder or args.coco}: the gallery would be empty')
    enrolled, held = split_examples(groups, args.per_identity, args.seed, args.max_held)
    model = init_detector(args.config, args.checkpoint, device=args.device)
    embed = Embedder(model, args.score_thr)

    def run(items, role):
        emb, owner = [], []
        for k, (path, box) in items:
            e = embed(path, box)
            if isinstance(e, str):
                skipped.append(f'{path} ({role} example of {names[k]!r}: {e})')
            else:
                emb.append(e)
                owner.append(k)
        emb = torch.as_tensor(np.array(emb, np.float32)) if emb else torch.zeros(0, 0)
        return emb, torch.tensor(owner, dtype=torch.long)

    emb, owner = run(enrolled, 'enrolled')
    held_emb, held_owner = run(held, 'held-out')
    if skipped:
        print(f'skipped {len(skipped)}:\n  ' + '\n  '.join(skipped), file=sys.stderr)
    kept = sorted(set(owner.tolist()))
    if not kept:
        raise SystemExit('error: no example could be enrolled (see the skipped list): the gallery would be empty')
    missing = [names[k] for k in range(len(names)) if k not in kept]
    if missing:
        print(f'left out {len(missing)} identities without an enrolled example: {", ".join(missing[:20])}',
              file=sys.stderr)
    remap = torch.full((len(names),), -1, dtype=torch.long)
    remap[kept] = torch.arange(len(kept))
    names = [names[k] for k in kept]
    owner, held_owner = remap[owner], remap[held_owner]
    held_emb, held_owner = held_emb[held_owner >= 0], held_owner[held_owner >= 0]
    info = dict(config=args.config, checkpoint=args.checkpoint, source=args.folder or args.coco,
                per_identity=args.per_identity, skipped=len(skipped))
    if args.threshold is not None:
        threshold, info['threshold_from'] = args.threshold, 'given (--threshold)'
    else:
        try:
            t = choose_threshold(emb, owner, held_emb, held_owner, len(names))
        except GalleryError as e:
            raise SystemExit(f'error: {e} (--threshold)')
        threshold = t['threshold']
        info['threshold_from'] = (f"held-out pairs: {t['same_pairs']} same, {t['different_pairs']} different, "
                                  f"accuracy {t['accuracy']:.4f}")
    gallery = Gallery(names, emb, owner, threshold, info)
    print(f'{gallery.save(args.out)}: {gallery.describe()}')
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == 'show':
        from gfl_det.gallery import Gallery, GalleryError
        try:
            g = Gallery.load(args.gallery)
        except GalleryError as e:
            raise SystemExit(f'error: {e}')
        print(f'{args.gallery}: {g.describe()}')
        print('identities: ' + ', '.join(g.names[:50]) + (' ...' if len(g.names) > 50 else ''))
        return 0
    return enroll(args)


if __name__ == '__main__':
    sys.exit(main())
