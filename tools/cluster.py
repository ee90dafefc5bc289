#!/usr/bin/env python
"""Cluster every detection of a folder of images by its embedding and write one contact sheet per
cluster (FaceNet's third use: grouping unlabelled pictures of the same identity).

    python tools/cluster.py data/synthetic_reid/val configs/gfl_r18_synthetic_reid.py \
        work_dirs/gfl_r18_synthetic_reid/epoch_12.pth --out-dir clusters/
    # -> clusters/cluster_000.png (the largest), ..., clusters/clusters.json

Detections scoring at least ``--score-thr`` are embedded (the model needs ``bbox_head.embed``).
``--k K``: k-means into K clusters; otherwise average-linkage agglomerative clustering that stops
joining at distance ``--threshold`` (on unit vectors; a gallery's verification threshold,
``--threshold-from gallery.pt``, is a good value). Clusters smaller than ``--min-size`` get no
sheet. ``clusters.json`` lists every detection (file, box, score, class, cluster). Files that are
not images or do not decode are skipped, named and counted.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='cluster the detections of a folder by their embeddings')
    p.add_argument('folder', help='a folder of images')
    p.add_argument('config', help='config of a model with an embedding branch (bbox_head.embed)')
    p.add_argument('checkpoint', help='its checkpoint')
    p.add_argument('--out-dir', default='clusters', help='where the contact sheets go (default clusters/)')
    p.add_argument('--score-thr', type=float, default=0.3, help='embed detections scoring at least this (0.3)')
    how = p.add_mutually_exclusive_group()
    how.add_argument('--k', type=int, default=None, help='k-means with this many clusters')
    how.add_argument('--threshold', type=float, default=None,
                     help='agglomerative (average linkage) up to this distance (default 1.0)')
    how.add_argument('--threshold-from', metavar='GALLERY', help="use a gallery's verification threshold")
    p.add_argument('--min-size', type=int, default=1, help='no sheet for clusters smaller than this (default 1)')
    p.add_argument('--margin', type=float, default=0.1, help='crop margin around each box, fraction of its size')
    p.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda'")
    args = p.parse_args(argv)
    if args.k is not None and args.k < 1:
        p.error('--k must be >= 1')
    return args


def detect_folder(model, paths: list[str], score_thr: float):
    """(records [{file, box, score, label}], embeddings (N, D), crops [RGB], skipped [str])."""
    import numpy as np
    from tqdm import tqdm

    from gfl_det.apis import inference_detector, read_images
    records, emb, crops, skipped = [], [], [], []
    for path, rgb, problem in read_images(tqdm(paths, unit='img', dynamic_ncols=True, disable=len(paths) < 2)):
        if problem:
            skipped.append(f'{path} ({problem})')
            continue
        res = inference_detector(model, rgb, channel_order='rgb')
        if 'embeddings' not in res:
            raise SystemExit('error: the model has no embedding branch (model.bbox_head.embed): nothing to cluster')
        names = res['class_names']
        for i in np.flatnonzero(res['scores'] >= score_thr):
            box = res['bboxes'][i]
            records.append(dict(file=osp.basename(path), box=[round(float(v), 1) for v in box],
                                score=round(float(res['scores'][i]), 4),
                                label=names[i] if names else int(res['labels'][i])))
            emb.append(res['embeddings'][i])
            crops.append((rgb, box))
    return records, np.array(emb, np.float32).reshape(len(emb), -1), crops, skipped


def cluster(emb, k: int | None, threshold: float):
    """(N,) cluster index of each embedding, the largest cluster 0."""
    import numpy as np
    import torch
    if len(emb) == 1:
        return np.zeros(1, np.int64)
    if k is not None:
        from gfl_det.metric.evaluation import kmeans
        assign = kmeans(torch.from_numpy(emb), min(k, len(emb))).numpy()
    else:
        from sklearn.cluster import AgglomerativeClustering
        assign = AgglomerativeClustering(n_clusters=None, distance_threshold=threshold,
                                         linkage='average').fit_predict(emb)
    sizes = np.bincount(assign)
    rank = np.empty_like(sizes)
    rank[np.argsort(-sizes, kind='stable')] = np.arange(len(sizes))
    return rank[assign]


def crop(rgb, box, margin: float):
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = box
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    x1, y1 = int(max(0, x1 - mx)), int(max(0, y1 - my))
    x2, y2 = int(min(w, x2 + mx + 1)), int(min(h, y2 + my + 1))
    return rgb[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, what in ((args.folder, 'folder'), (args.config, 'config'), (args.checkpoint, 'checkpoint'),
                       (args.threshold_from, 'gallery')):
        if path and not osp.exists(path):
            raise SystemExit(f'error: {what} not found: {path}')
    if not osp.isdir(args.folder):
        raise SystemExit(f'error: {args.folder} is not a folder')
    threshold = 1.0 if args.threshold is None else args.threshold
    if args.threshold_from:
        from gfl_det.gallery import Gallery, GalleryError
        try:
            threshold = Gallery.load(args.threshold_from).threshold
        except GalleryError as e:
            raise SystemExit(f'error: {e}')
    from gfl_det.apis import init_detector
    from gfl_det.fast.malloc import retain_freed_memory
    from gfl_det.visualize import contact_sheet, save_image
    retain_freed_memory()
    paths = sorted(osp.join(args.folder, f) for f in os.listdir(args.folder)
                   if not f.startswith('.') and osp.isfile(osp.join(args.folder, f)))
    model = init_detector(args.config, args.checkpoint, device=args.device)
    records, emb, crops, skipped = detect_folder(model, paths, args.score_thr)
    if skipped:
        print(f'skipped {len(skipped)} of {len(paths)} file(s):\n  ' + '\n  '.join(skipped), file=sys.stderr)
    if not records:
        raise SystemExit(f'error: no detection scoring >= {args.score_thr} in {args.folder}: nothing to cluster')
    assign = cluster(emb, args.k, threshold)
    os.makedirs(args.out_dir, exist_ok=True)
    sheets = 0
    for c in range(int(assign.max()) + 1):
        members = [i for i in range(len(records)) if assign[i] == c]
        if len(members) < args.min_size:
            continue
        tiles = [crop(*crops[i], args.margin) for i in members]
        save_image(osp.join(args.out_dir, f'cluster_{c:03d}.png'),
                   contact_sheet(tiles, [records[i]['file'] for i in members]))
        sheets += 1
    for r, c in zip(records, assign):
        r['cluster'] = int(c)
    with open(osp.join(args.out_dir, 'clusters.json'), 'w') as f:
        json.dump(records, f, indent=1)
    how = f'k-means, k = {args.k}' if args.k else f'average linkage up to distance {threshold:.3f}'
    print(f'{len(records)} detections in {int(assign.max()) + 1} clusters ({how}); '
          f'{sheets} contact sheet(s) and clusters.json in {args.out_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
