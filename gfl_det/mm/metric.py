"""COCO box mAP as an mmengine metric (``val_evaluator = dict(type='CocoMetric', ...)``)."""
from __future__ import annotations

import os
import os.path as osp
from typing import Any, Sequence, Union

from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger

from ..evaluation import METRIC_NAMES, CocoEvaluator
from .registry import METRICS

__all__ = ['CocoMetric']


@METRICS.register_module(name='CocoMetric')
class CocoMetric(BaseMetric):
    """COCO bbox mAP through pycocotools (:class:`gfl_det.evaluation.CocoEvaluator`).

    Logs COCOeval's 12 numbers and a per-class AP table; returns all 12 under MMDetection's names
    with the ``coco/`` prefix (``coco/bbox_mAP``, ``coco/bbox_mAP_50``, ...) so that
    ``CheckpointHook(save_best='coco/bbox_mAP')`` works.

    Images that failed to load (the dataset's ``on_bad_image='skip'`` stand-ins, flagged
    ``load_failed``) are not scored: they are listed in a warning and counted as
    ``coco/failed_images`` (a 13th key, present only when some failed); the metrics are those
    of the images that loaded. A model that outputs no detections at all gets AP 0.

    Args:
        ann_file: the COCO annotation JSON of the evaluated split.
        metric: ``'bbox'`` (the only one).
        classwise: per-class AP table (default True; mmdet's default is False).
        format_only: only write the results file, do not evaluate.
        outfile: write the detections as a COCO results JSON to this path.
        outfile_prefix: mmdet's spelling: write ``{outfile_prefix}.bbox.json``.
    """

    default_prefix = 'coco'

    def __init__(self, ann_file: str, metric: Union[str, Sequence[str]] = 'bbox',
                 classwise: bool = True, format_only: bool = False, outfile: str | None = None,
                 outfile_prefix: str | None = None, collect_device: str = 'cpu',
                 prefix: str | None = None, backend_args: Any = None, **unused: Any):
        super().__init__(collect_device=collect_device, prefix=prefix)
        metrics = [metric] if isinstance(metric, str) else list(metric)
        if metrics != ['bbox']:
            raise NotImplementedError(f"CocoMetric supports metric='bbox' only, got {metric!r}")
        self.ann_file = ann_file
        self.classwise = classwise
        self.format_only = format_only
        self.outfile = outfile or (f'{outfile_prefix}.bbox.json' if outfile_prefix else None)
        if format_only and not self.outfile:
            raise ValueError('CocoMetric(format_only=True) needs outfile (or outfile_prefix)')

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for p in data_samples:
            r = {'img_id': int(p['img_id']),
                 'bboxes': p['bboxes'].detach().cpu().numpy(),
                 'scores': p['scores'].detach().cpu().numpy(),
                 'labels': p['labels'].detach().cpu().numpy()}
            if p.get('load_failed'):  # counted and reported, not scored
                r.update(load_failed=str(p['load_failed']), file_name=str(p.get('file_name')))
            self.results.append(r)

    def compute_metrics(self, results: list) -> dict:
        logger = MMLogger.get_current_instance()
        cat_ids = (self.dataset_meta or {}).get('cat_ids')
        ev = CocoEvaluator(self.ann_file, cat_ids=cat_ids, classwise=self.classwise,
                           logger=logger)
        ev.process(results, [{k: r[k] for k in ('img_id', 'load_failed', 'file_name') if k in r}
                             for r in results])
        if self.outfile:
            d = osp.dirname(osp.abspath(self.outfile))
            os.makedirs(d, exist_ok=True)
            ev.dump(self.outfile)
            logger.info(f'wrote {len(ev.results)} detections (COCO results format) to {self.outfile}')
        if self.format_only:
            return {}
        res = ev.evaluate()
        self.last_evaluator = ev  # tools/test.py --plot-dir: PR curves and confusion matrix
        metrics = {name: float(res[name]) for name in METRIC_NAMES}
        if res['failed_images']:  # only then, so that a clean run has MMDetection's 12 keys
            metrics['failed_images'] = float(len(res['failed_images']))
        return metrics
