"""Plots as PNG files (matplotlib's Agg canvas; no display and no global backend change).

* :func:`plot_curves` -- training curves from mmengine's ``vis_data/scalars.json``
  (``tools/analyze_logs.py plot_curve``).
* :func:`plot_pr_curves` -- precision-recall curves from COCOeval's ``eval['precision']``
  (``tools/test.py --plot-dir``).
* :func:`confusion_matrix` / :func:`plot_confusion_matrix` -- detections against ground truth at
  IoU >= 0.5, with a background row (false positives) and column (missed objects).
"""
from __future__ import annotations

import glob
import json
import os
import warnings
from typing import Optional, Sequence

import numpy as np

__all__ = ['find_scalars', 'read_scalars', 'resolve_key', 'plot_curves', 'plot_pr_curves',
           'confusion_matrix', 'plot_confusion_matrix', 'write_eval_plots']


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    return out


# ----------------------------------------------------------------------------------------------
# training curves
# ----------------------------------------------------------------------------------------------
def find_scalars(path: str) -> str:
    """``path`` itself if it is a file, else the newest ``<timestamp>/vis_data/scalars.json``
    under the work dir ``path``."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f'no such work dir or scalars file: {path}')
    runs = sorted(glob.glob(os.path.join(path, '*', 'vis_data', 'scalars.json')))
    if not runs:
        raise FileNotFoundError(f'no <timestamp>/vis_data/scalars.json under {path}: is it a work dir '
                                'of tools/train.py? (pass the json file itself otherwise)')
    return runs[-1]  # timestamps sort in time order


def read_scalars(path: str) -> list[dict]:
    """The JSON lines of an mmengine scalars file (a line that does not parse is an error)."""
    records = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f'{path}, line {n}: not JSON ({e})') from None
    return records


def resolve_key(key: str, available: Sequence[str]) -> str:
    """The logged name of ``key``: exact, or MMDetection's short form of a metric (``bbox_mAP``
    for ``coco/bbox_mAP``). Raises KeyError listing the keys that exist."""
    if key in available:
        return key
    matches = [k for k in available if k.split('/')[-1] == key]
    if len(matches) == 1:
        return matches[0]
    raise KeyError(f'key {key!r} is not in the log' + (f' (ambiguous: {matches})' if matches else '')
                   + f'; keys that exist: {", ".join(sorted(available))}')


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, x label): training scalars against the iteration, validation ones (logged without
    'iter', step = epoch) against the epoch; a key logged in both (time) is taken from training."""
    rows = [r for r in records if key in r and 'iter' in r]
    if rows:
        return (np.asarray([r['iter'] for r in rows], float), np.asarray([r[key] for r in rows], float),
                'iteration')
    rows = [r for r in records if key in r]
    return (np.asarray([r.get('step', i + 1) for i, r in enumerate(rows)], float),
            np.asarray([r[key] for r in rows], float), 'epoch')


def plot_curves(runs: Sequence[list[dict]], keys: Sequence[str], out: str,
                legend: Optional[Sequence[str]] = None, title: Optional[str] = None) -> str:
    """One panel per key, one line per run (``runs``: lists of scalar records). Keys may be
    given short (``bbox_mAP``); a key missing from a run raises KeyError naming those present."""
    legend = list(legend) if legend else [f'run {i + 1}' for i in range(len(runs))]
    fig = _figure(8, 2.6 * len(keys))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(len(keys), 1, i + 1)
        for records, name in zip(runs, legend):
            avail = sorted({k for r in records for k in r} - {'epoch', 'iter', 'step'})
            real = resolve_key(key, avail)
            x, y, xlabel = _series(records, real)
            ax.plot(x, y, marker='o' if xlabel == 'epoch' else None, markersize=3,
                    label=name if len(runs) > 1 else real)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(real)
        ax.grid(alpha=0.3)
        ax.legend(loc='best', fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


# ----------------------------------------------------------------------------------------------
# precision-recall
# ----------------------------------------------------------------------------------------------
def _mean_precision(prec: np.ndarray) -> np.ndarray:
    """(R, ...) precision with -1 = undefined -> (R,) mean over the defined entries (nan if none)."""
    p = prec.reshape(prec.shape[0], -1).astype(float)
    p[p < 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # "mean of empty slice": nan is the answer
        return np.nanmean(p, 1)


def plot_pr_curves(precision: np.ndarray, iou_thrs: Sequence[float], rec_thrs: Sequence[float],
                   out: str, area_labels: Sequence[str] = ('all', 'small', 'medium', 'large'),
                   title: str = '') -> str:
    """Precision-recall curves, averaged over classes, from COCOeval's ``eval['precision']``
    (T IoU thresholds, R recall thresholds, K classes, A areas, M maxDets; the largest maxDets
    is used). Panels: IoU 0.5, 0.75 and the mean over 0.5:0.95; one curve per area range,
    labelled with its AP (the curve's mean, as COCOeval)."""
    iou_thrs = np.asarray(iou_thrs, float)
    rec = np.asarray(rec_thrs, float)
    fig = _figure(15, 4.6)
    panels = [('IoU=0.50', [int(np.argmin(np.abs(iou_thrs - 0.5)))]),
              ('IoU=0.75', [int(np.argmin(np.abs(iou_thrs - 0.75)))]),
              ('IoU=0.50:0.95', list(range(len(iou_thrs))))]
    for i, (name, t) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for a, area in enumerate(area_labels):
            prec = precision[t][:, :, :, a, -1]  # (t, R, K)
            curve = _mean_precision(np.moveaxis(prec, 1, 0))
            if np.isnan(curve).all():
                continue
            ax.plot(rec, curve, label=f'{area}: AP {np.nanmean(curve):.3f}')
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel('recall')
        ax.set_ylabel('precision')
        ax.set_title(f'{title} {name}'.strip())
        ax.grid(alpha=0.3)
        ax.legend(loc='lower left', fontsize=8)
    return _save(fig, out)


# ----------------------------------------------------------------------------------------------
# confusion matrix
# ----------------------------------------------------------------------------------------------
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4), (m, 4) xyxy -> (n, m) IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def confusion_matrix(gts: Sequence[tuple[np.ndarray, np.ndarray]],
                     dets: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int,
                     iou_thr: float = 0.5, score_thr: float = 0.3) -> np.ndarray:
    """(C + 1, C + 1) counts: rows the true class, columns the predicted class; row C is
    background (a detection that matches no object: false positive), column C background (an
    object no detection matched: missed).

    Per image: ``gts[i]`` = (boxes (n, 4) xyxy, labels (n,)), ``dets[i]`` = (boxes, scores,
    labels). Detections scoring at least ``score_thr``, best first, each take the unmatched
    object of highest IoU >= ``iou_thr`` whatever its class (so a wrong class shows off the
    diagonal)."""
    C = num_classes
    m = np.zeros((C + 1, C + 1), np.int64)
    for (gb, gl), (db, ds, dl) in zip(gts, dets):
        gb, gl = np.asarray(gb, float).reshape(-1, 4), np.asarray(gl, int).reshape(-1)
        keep = np.asarray(ds, float).reshape(-1) >= score_thr
        order = np.argsort(-np.asarray(ds, float).reshape(-1)[keep], kind='stable')
        db = np.asarray(db, float).reshape(-1, 4)[keep][order]
        dl = np.asarray(dl, int).reshape(-1)[keep][order]
        free = np.ones(len(gb), bool)
        ious = _iou(db, gb) if len(gb) and len(db) else np.zeros((len(db), len(gb)))
        for j in range(len(db)):
            cand = np.where(free, ious[j], -1.0)
            g = int(np.argmax(cand)) if len(gb) else -1
            if g >= 0 and cand[g] >= iou_thr:
                free[g] = False
                m[gl[g], dl[j]] += 1
            else:
                m[C, dl[j]] += 1
        for g in np.flatnonzero(free):
            m[gl[g], C] += 1
    return m


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], out: str,
                          title: str = 'confusion matrix (IoU >= 0.5)') -> str:
    """The matrix as an image: colour = share of its row (each true class sums to 1), the
    count written in every non-empty cell."""
    names = list(class_names) + ['background']
    n = len(names)
    rows = matrix.sum(1, keepdims=True)
    share = matrix / np.maximum(rows, 1)
    size = max(5.0, 0.45 * n + 2)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap='Blues', vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='share of the true class')
    ax.set_xticks(range(n), names, rotation=60, ha='right', fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha='center', va='center', fontsize=7,
                            color='white' if share[i, j] > 0.5 else 'black')
    return _save(fig, out)


def write_eval_plots(evaluator, out_dir: str, score_thr: float = 0.3, iou_thr: float = 0.5) -> list[str]:
    """``pr_curves.png`` and ``confusion_matrix.png`` in ``out_dir`` for a
    :class:`gfl_det.evaluation.CocoEvaluator` that has evaluated (its ``last_result``)."""
    res = getattr(evaluator, 'last_result', None)
    if res is None:
        raise RuntimeError('the evaluator has not evaluated yet: nothing to plot')
    gt = evaluator.coco_gt
    label_of = {c: i for i, c in enumerate(evaluator.cat_ids)}
    names = [str(gt.cats[c].get('name', c)) for c in evaluator.cat_ids]
    by_image: dict[int, list[dict]] = {i: [] for i in evaluator.img_ids}
    for r in evaluator.results:
        by_image[r['image_id']].append(r)

    def xyxy(rows: list[dict]) -> np.ndarray:
        b = np.asarray([r['bbox'] for r in rows], float).reshape(-1, 4)
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)

    gts, dets = [], []
    for img_id in evaluator.img_ids:
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[img_id], iscrowd=False))
                if a['category_id'] in label_of]
        gts.append((xyxy(anns), [label_of[a['category_id']] for a in anns]))
        rows = by_image[img_id]
        dets.append((xyxy(rows), [r['score'] for r in rows], [label_of[r['category_id']] for r in rows]))
    matrix = confusion_matrix(gts, dets, len(names), iou_thr=iou_thr, score_thr=score_thr)
    return [plot_pr_curves(res['precision'], res['iou_thrs'], res['rec_thrs'],
                           os.path.join(out_dir, 'pr_curves.png'), res['area_labels']),
            plot_confusion_matrix(matrix, names, os.path.join(out_dir, 'confusion_matrix.png'),
                                  f'confusion matrix (IoU >= {iou_thr}, score >= {score_thr})')]
