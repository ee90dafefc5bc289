"""COCO bbox evaluation with pycocotools (no mmengine here; gfl_det/mm.py wraps it).

Three entry points:

* :func:`predictions_to_coco` -- model predictions (the contract's ``predict`` output:
  xyxy boxes in original-image pixels, scores, contiguous labels) -> COCO result dicts.
* :func:`coco_evaluate` -- COCO GT + result dicts -> the 12 ``COCOeval.stats`` numbers,
  named metrics, a per-class AP table and the COCOeval summary text.
* :class:`CocoEvaluator` -- accumulates batches (``process``) and evaluates at the end.

Numbers are pycocotools' own, at full precision: boxes are converted xyxy -> xywh in float64
from the float32 predictions and never rounded (rounding boxes to a few decimals moves AP in
the 4th-5th digit), so evaluating in memory and evaluating the dumped JSON give identical stats.

Deviations from MMDetection 3.x ``CocoMetric`` (flagged as the design guide asks):

* ``COCOeval.params.maxDets`` stays pycocotools' default ``[1, 10, 100]`` (the official COCO
  protocol); mmdet passes ``proposal_nums=(100, 300, 1000)``. AP is the same whenever a model
  keeps <= 100 boxes per image (GFL's ``max_per_img=100``); the AR numbers are AR@1/10/100
  here instead of mmdet's AR@100/300/1000.
* Metrics are returned unrounded (mmdet rounds to 3 decimals).
* An empty result list evaluates to pycocotools' numbers for "no detections" (0 where a
  category has GT, -1 where nothing is defined) instead of mmdet's "results are empty" log
  line with no metrics.
* ``CocoEvaluator`` evaluates on the images it was given (``process``) like mmdet 2.x
  (``params.imgIds = dataset img_ids``); images that failed to load are excluded and reported.
* The ground truth read from a file is cleaned as training cleans it (:func:`load_coco_gt`):
  boxes the loader rejects are not scored, boxes crossing the border are scored clipped (mmdet
  scores the raw JSON). On valid COCO annotations nothing changes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import numbers
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    'METRIC_NAMES', 'predictions_to_coco', 'load_coco_gt', 'load_results',
    'coco_evaluate', 'CocoEvaluator', 'format_table',
]

# Names of COCOeval.stats[0..11], in COCOeval's order. The first six are MMDetection's names;
# the AR names carry pycocotools' default maxDets (1, 10, 100).
METRIC_NAMES = (
    'bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m', 'bbox_mAP_l',
    'bbox_AR@1', 'bbox_AR@10', 'bbox_AR@100', 'bbox_AR_s@100', 'bbox_AR_m@100',
    'bbox_AR_l@100',
)

LogFn = Union[None, logging.Logger, Callable[[str], Any]]


def _log(logger: LogFn, msg: str, level: int = logging.INFO) -> None:
    if logger is None:
        return
    if isinstance(logger, logging.Logger):
        logger.log(level, msg)
    else:
        logger(msg)


# ----------------------------------------------------------------------------------------------
# predictions -> COCO result dicts
# ----------------------------------------------------------------------------------------------
def predictions_to_coco(preds: Sequence[Mapping[str, Any]], metas: Sequence[Mapping[str, Any]],
                        cat_ids: Sequence[int]) -> list[dict]:
    """Convert per-image predictions to COCO result dicts.

    Args:
        preds: list over B images of ``{'bboxes': (k, 4) xyxy in original-image pixels,
            'scores': (k,), 'labels': (k,) int}`` (torch tensors or numpy arrays).
        metas: list over B images, each with ``'img_id'``.
        cat_ids: COCO category id of each contiguous label (``cat_ids[label]``).

    Returns:
        ``[{'image_id': int, 'category_id': int, 'bbox': [x, y, w, h], 'score': float}, ...]``
        with plain Python numbers. Boxes are not rounded: float32 coordinates become Python
        floats exactly and w/h are computed in float64 (as MMDetection's ``xyxy2xywh`` does).
    """
    if len(preds) != len(metas):
        raise ValueError(f'predictions_to_coco: {len(preds)} predictions but {len(metas)} metas')
    cat_ids = [int(c) for c in cat_ids]
    out: list[dict] = []
    for pred, meta in zip(preds, metas):
        img_id = int(meta['img_id'])
        bboxes = _to_numpy(pred['bboxes']).astype(np.float64).reshape(-1, 4)  # (k, 4)
        scores = _to_numpy(pred['scores']).astype(np.float64).reshape(-1)     # (k,)
        labels = _to_numpy(pred['labels']).astype(np.int64).reshape(-1)       # (k,)
        if not (len(bboxes) == len(scores) == len(labels)):
            raise ValueError(f'image {img_id}: bboxes/scores/labels lengths differ '
                             f'({len(bboxes)}, {len(scores)}, {len(labels)})')
        if len(labels) and (labels.min() < 0 or labels.max() >= len(cat_ids)):
            raise ValueError(f'image {img_id}: label {int(labels.max())} or {int(labels.min())} '
                             f'outside 0..{len(cat_ids) - 1} (the model has more classes than '
                             f'cat_ids maps: {len(cat_ids)})')
        xywh = bboxes.copy()
        xywh[:, 2:] -= bboxes[:, :2]
        for box, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
            out.append({'image_id': img_id, 'category_id': cat_ids[label],
                        'bbox': box, 'score': score})
    return out


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, 'detach'):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def load_coco_gt(coco_gt: Union[COCO, str, os.PathLike], logger: LogFn = None) -> COCO:
    """A pycocotools COCO from a COCO object (used as it is) or an annotation-file path.

    A file read here is cleaned exactly as training cleans it
    (:func:`gfl_det.data.groundtruth.clean_coco_gt`): boxes the dataset rejects -- NaN,
    malformed, zero or negative size, tiny, zero area, unknown image or category, outside or
    mostly outside the image -- are not scored, boxes crossing the border are scored clipped,
    crowd boxes stay ignore regions. The difference from the raw JSON is logged (annotation
    ids and why), so is a missing ``area`` / ``iscrowd`` (filled as the box's area and 0), and a
    ground truth with no box at all (every metric would be -1). ``tools/check_dataset.py``
    reports the same cases by file.
    """
    if isinstance(coco_gt, COCO):
        return coco_gt
    from .data.groundtruth import clean_coco_gt
    from .data.validation import check_coco_structure
    path = os.fspath(coco_gt)
    data = _read_json(path, 'annotation file')
    if not isinstance(data, dict) or 'images' not in data or 'categories' not in data:
        raise ValueError(f'annotation file {path!r} is not a COCO instances file '
                         f'(needs a JSON object with "images" and "categories")')
    check_coco_structure(data, path)
    anns = data.get('annotations') or []
    lacking = sum(1 for a in anns if isinstance(a, Mapping) and ('area' not in a or 'iscrowd' not in a))
    data, info = clean_coco_gt(data)
    if info['left_out'] or info['clipped']:
        _log(logger, f'ground truth {path}: {info["num_scored"]} box(es) scored of '
             f'{info["num_json"]} annotation(s) in the JSON, cleaned as training cleans them: '
             f'{len(info["left_out"])} left out of the evaluation: annotation ids '
             f'{_head(info["left_out"])}; {len(info["clipped"])} scored clipped to their image'
             + (f': annotation ids {_head(info["clipped"])}' if info['clipped'] else '')
             + f'. Why (tools/check_dataset.py {path} IMG_DIR lists every problem):\n'
             + '\n'.join(info['report'].lines()), logging.WARNING)
    if lacking:
        _log(logger, f'annotation file {path}: {lacking} ground-truth annotation(s) '
             "without 'area' or 'iscrowd': evaluated with area = w * h, iscrowd = 0",
             logging.WARNING)
    if not info['num_scored']:
        _log(logger, f'ground truth {path}: no box to score ({info["num_json"]} annotation(s) in '
             'the JSON, none usable): every COCO metric will be -1 (undefined)', logging.WARNING)
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def load_results(results: Union[str, os.PathLike, Sequence[Mapping]]) -> list[dict]:
    """Result dicts from a list or a COCO results JSON path; validates every entry."""
    source = 'results'
    if isinstance(results, (str, os.PathLike)):
        source = f'results file {os.fspath(results)!r}'
        results = _read_json(os.fspath(results), 'results file')
    if not isinstance(results, (list, tuple)):
        raise ValueError(f'{source}: expected a JSON list of detections, '
                         f'got {type(results).__name__}')
    out = []
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise ValueError(f'{source}: entry {i} is {type(r).__name__}, expected an object')
        missing = [k for k in ('image_id', 'category_id', 'bbox', 'score') if k not in r]
        if missing:
            raise ValueError(f'{source}: entry {i} lacks {missing} (bbox results need '
                             f'image_id, category_id, bbox [x, y, w, h], score)')
        bbox = r['bbox']
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in bbox)):
            raise ValueError(f'{source}: entry {i} has bbox {bbox!r}; expected 4 finite '
                             f'numbers [x, y, w, h]')
        if not isinstance(r['score'], numbers.Real) or not math.isfinite(r['score']):
            raise ValueError(f'{source}: entry {i} has score {r["score"]!r}')
        # copy: loadRes adds id/area/iscrowd/segmentation to each dict it is given
        out.append(dict(r))
    return out


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} not found: {path!r}')
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{what} {path!r} is not valid JSON: {e}') from None


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def coco_evaluate(coco_gt: Union[COCO, str, os.PathLike],
                  results: Union[str, os.PathLike, Sequence[Mapping]],
                  classwise: bool = True,
                  img_ids: Optional[Iterable[int]] = None,
                  cat_ids: Optional[Sequence[int]] = None,
                  failed_images: Optional[Sequence[str]] = None,
                  logger: LogFn = None) -> dict:
    """Evaluate COCO bbox results with pycocotools' COCOeval.

    Args:
        coco_gt: pycocotools ``COCO`` or path to the annotation JSON.
        results: list of result dicts (``image_id, category_id, bbox xywh, score``) or a path to
            a COCO results JSON. May be empty.
        classwise: also compute per-class AP and a text table.
        img_ids: evaluate on these images only (``COCOeval.params.imgIds``); ``None`` = every
            image of the GT. Pass the images the model actually ran on (as mmdet does with the
            dataset's ids): images without detections must still be included, their GT count
            as misses.
        cat_ids: categories to evaluate (``params.catIds``); ``None`` = every GT category.
        failed_images: file names of images that could not be loaded (so were not predicted);
            their number is reported in the log and the returned dict.
        logger: ``logging.Logger`` or a print-like callable; ``None`` = silent.

    Returns:
        dict with
          ``'stats'``: the 12 ``COCOeval.stats`` as floats, in COCOeval's order;
          one float per name of :data:`METRIC_NAMES` (``'bbox_mAP'``, ... ``'bbox_AR_l@100'``);
          ``'summary'``: COCOeval's summary text;
          ``'classwise'``: list of ``{'category_id', 'name', 'num_gt', 'AP', 'AP50', 'AP75',
          'AP_s', 'AP_m', 'AP_l'}`` (nan where pycocotools has nothing to average) and
          ``'classwise_table'``: the same as text (only when ``classwise``);
          ``'num_images'``, ``'num_detections'``, ``'failed_images'`` (list of names);
          ``'precision'``: COCOeval's ``eval['precision']`` (T IoUs, R recalls, K classes,
          A areas, M maxDets; -1 = undefined) with its axes ``'iou_thrs'``, ``'rec_thrs'``,
          ``'area_labels'``, ``'eval_cat_ids'``.

    Raises:
        ValueError: results name an image or a category that is not in the GT, an img_id or
            cat_id that is not in the GT, or are malformed.
    """
    gt = load_coco_gt(coco_gt, logger=logger)
    dets = load_results(results)
    failed_images = [str(f) for f in (failed_images or [])]

    gt_img_ids = set(gt.getImgIds())
    gt_cat_ids = set(gt.getCatIds())
    bad_imgs = sorted({r['image_id'] for r in dets} - gt_img_ids)
    if bad_imgs:
        raise ValueError(f'results contain {len(bad_imgs)} image id(s) not in the annotation '
                         f'file: {_head(bad_imgs)} -- are results and annotations from the '
                         f'same split?')
    bad_cats = sorted({r['category_id'] for r in dets} - gt_cat_ids)
    if bad_cats:
        raise ValueError(f'results contain category id(s) not in the annotation file: '
                         f'{_head(bad_cats)}; GT category ids are {_head(sorted(gt_cat_ids))} '
                         f'-- is the label -> category id mapping (cat_ids) right?')
    if img_ids is not None:
        img_ids = sorted({int(i) for i in img_ids})
        unknown = sorted(set(img_ids) - gt_img_ids)
        if unknown:
            raise ValueError(f'img_ids not in the annotation file: {_head(unknown)}')
        outside = {r['image_id'] for r in dets} - set(img_ids)
        if outside:
            _log(logger, f'{len(outside)} image(s) have detections but are not in img_ids; '
                         f'their detections are ignored: {_head(sorted(outside))}',
                 logging.WARNING)
    if cat_ids is not None:
        cat_ids = [int(c) for c in cat_ids]
        unknown = sorted(set(cat_ids) - gt_cat_ids)
        if unknown:
            raise ValueError(f'cat_ids not in the annotation file: {_head(unknown)}')

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # pycocotools prints progress; keep it out
        if dets:
            dt = gt.loadRes(dets)
        else:
            # loadRes indexes anns[0] and crashes on an empty list; an empty result set is a
            # valid (if bad) model output, so build the empty result COCO the way loadRes would.
            dt = COCO()
            dt.dataset = {'images': list(gt.dataset['images']),
                          'categories': copy.deepcopy(gt.dataset['categories']),
                          'annotations': []}
            dt.createIndex()
        coco_eval = COCOeval(gt, dt, 'bbox')
        if img_ids is not None:
            coco_eval.params.imgIds = img_ids
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary_buf = io.StringIO()
    with contextlib.redirect_stdout(summary_buf):
        coco_eval.summarize()
    summary = summary_buf.getvalue().rstrip('\n')

    stats = [float(s) for s in coco_eval.stats]
    num_images = len(coco_eval.params.imgIds)
    out: dict[str, Any] = {'stats': stats}
    out.update(zip(METRIC_NAMES, stats))
    out.update(summary=summary, num_images=num_images, num_detections=len(dets),
               failed_images=failed_images)
    p = coco_eval.params  # for precision-recall plots (gfl_det.plots.plot_pr_curves)
    out.update(precision=coco_eval.eval['precision'], iou_thrs=p.iouThrs, rec_thrs=p.recThrs,
               area_labels=list(p.areaRngLbl), eval_cat_ids=list(p.catIds))

    if failed_images:
        _log(logger, f'{len(failed_images)} image(s) failed to load and are NOT in this '
                     f'evaluation: {_head(failed_images)}', logging.WARNING)
    if stats[0] == -1:
        _log(logger, f'no ground-truth box in the {num_images} evaluated image(s): every metric '
                     'is -1 (undefined), not a score', logging.WARNING)
    _log(logger, f'COCO bbox evaluation on {num_images} images, {len(dets)} detections:\n'
                 + summary)
    if classwise:
        rows = _classwise(coco_eval, gt)
        out['classwise'] = rows
        out['classwise_table'] = format_table(
            ['category', 'id', 'num_gt', 'AP', 'AP50', 'AP75', 'AP_s', 'AP_m', 'AP_l'],
            [[r['name'], r['category_id'], r['num_gt']]
             + [_fmt(r[k]) for k in ('AP', 'AP50', 'AP75', 'AP_s', 'AP_m', 'AP_l')]
             for r in rows])
        _log(logger, 'per-class bbox AP:\n' + out['classwise_table'])
    _log(logger, 'bbox_mAP_copypaste: ' + ' '.join(f'{s:.3f}' for s in stats[:6]))
    return out


def _classwise(coco_eval: COCOeval, gt: COCO) -> list[dict]:
    """Per-category AP from ``eval['precision']`` (T, R, K, A, M), as mmdet/detectron2 do:
    area 'all' (index 0) and the largest maxDets (index -1); -1 entries are excluded."""
    p = coco_eval.params
    precision = coco_eval.eval['precision']  # (T iou thrs, R recall thrs, K cats, A areas, M)
    iou50 = int(np.argmin(np.abs(p.iouThrs - 0.5)))
    iou75 = int(np.argmin(np.abs(p.iouThrs - 0.75)))
    img_set = set(p.imgIds)
    rows = []
    for k, cat_id in enumerate(p.catIds):
        def ap(prec: np.ndarray) -> float:
            prec = prec[prec > -1]
            return float(np.mean(prec)) if prec.size else float('nan')
        num_gt = sum(1 for a in gt.loadAnns(gt.getAnnIds(catIds=[cat_id], iscrowd=False))
                     if a['image_id'] in img_set)
        rows.append({
            'category_id': int(cat_id),
            'name': str(gt.cats[int(cat_id)].get('name', cat_id)),
            'num_gt': num_gt,
            'AP': ap(precision[:, :, k, 0, -1]),
            'AP50': ap(precision[iou50, :, k, 0, -1]),
            'AP75': ap(precision[iou75, :, k, 0, -1]),
            'AP_s': ap(precision[:, :, k, 1, -1]),
            'AP_m': ap(precision[:, :, k, 2, -1]),
            'AP_l': ap(precision[:, :, k, 3, -1]),
        })
    return rows


def _fmt(v: float) -> str:
    return 'nan' if math.isnan(v) else f'{v:.3f}'


def _head(items: Sequence, n: int = 10) -> str:
    items = list(items)
    s = ', '.join(map(str, items[:n]))
    return s + (f', ... ({len(items)} in all)' if len(items) > n else '')


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return ' | '.join(c.ljust(w) if i == 0 else c.rjust(w)
                          for i, (c, w) in enumerate(zip(r, widths)))
    sep = '-+-'.join('-' * w for w in widths)
    return '\n'.join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


# ----------------------------------------------------------------------------------------------
# accumulate-then-evaluate
# ----------------------------------------------------------------------------------------------
class CocoEvaluator:
    """Accumulates per-batch predictions and evaluates them with :func:`coco_evaluate`.

    Evaluation is restricted to the images passed to :meth:`process` (images without
    detections included); images reported through :meth:`add_failed` are listed as failed.

    Args:
        coco_gt: pycocotools ``COCO`` or annotation-file path.
        cat_ids: COCO category id of each contiguous label; ``None`` = the GT's category ids
            sorted ascending (the usual label order for COCO datasets).
        classwise: compute the per-class table.
        logger: ``logging.Logger`` or print-like callable; ``None`` = silent.
    """

    def __init__(self, coco_gt: Union[COCO, str, os.PathLike],
                 cat_ids: Optional[Sequence[int]] = None, classwise: bool = True,
                 logger: LogFn = None) -> None:
        self.coco_gt = load_coco_gt(coco_gt, logger=logger)
        self.cat_ids = ([int(c) for c in cat_ids] if cat_ids is not None
                        else sorted(self.coco_gt.getCatIds()))
        self.classwise = classwise
        self.logger = logger
        self.reset()

    def reset(self) -> None:
        self.results: list[dict] = []
        self.img_ids: list[int] = []
        self.failed_images: list[str] = []
        self._seen: set[int] = set()

    def process(self, preds: Sequence[Mapping[str, Any]],
                metas: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch: ``preds`` as returned by ``GFL.predict(..., rescale=True)``.

        An image whose meta has ``'load_failed'`` (the dataset's stand-in for a file that could
        not be loaded, :meth:`gfl_det.data.CocoDataset.failed_sample`) is recorded as failed
        (:meth:`add_failed`), not evaluated."""
        keep_p, keep_m = [], []
        for pred, meta in zip(preds, metas):
            img_id = int(meta['img_id'])
            if meta.get('load_failed'):
                if img_id not in self._seen:
                    self._seen.add(img_id)
                    self.add_failed([meta.get('file_name', f'image id {img_id}')])
                continue
            if img_id in self._seen:  # e.g. a distributed sampler padding the last batch
                _log(self.logger, f'image {img_id} predicted twice; keeping the first',
                     logging.WARNING)
                continue
            self._seen.add(img_id)
            self.img_ids.append(img_id)
            keep_p.append(pred)
            keep_m.append(meta)
        self.results.extend(predictions_to_coco(keep_p, keep_m, self.cat_ids))

    def add_failed(self, file_names: Iterable[str]) -> None:
        """Record images that could not be loaded (they are not evaluated)."""
        self.failed_images.extend(str(f) for f in file_names)

    def evaluate(self) -> dict:
        """Run COCOeval on the images processed so far; see :func:`coco_evaluate`. The result is
        also kept as ``last_result`` (tools/test.py --plot-dir reads its precision array)."""
        if not self.img_ids:
            raise RuntimeError('CocoEvaluator.evaluate: no images were processed'
                               + (f' ({len(self.failed_images)} failed to load: '
                                  f'{_head(self.failed_images)})' if self.failed_images else ''))
        self.last_result = coco_evaluate(self.coco_gt, self.results, classwise=self.classwise,
                                         img_ids=self.img_ids, cat_ids=self.cat_ids,
                                         failed_images=self.failed_images, logger=self.logger)
        return self.last_result

    def dump(self, path: Union[str, os.PathLike]) -> None:
        """Write the accumulated results as a COCO results JSON (for tools/eval_results.py)."""
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(self.results, f)
