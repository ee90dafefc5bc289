"""Re-identification metrics as an mmengine metric: ``dict(type='ReIDMetric')`` beside the
CocoMetric in ``val_evaluator`` / ``test_evaluator`` (a list) of a model with an embedding branch.

Logs and returns, with the ``reid/`` prefix: R@1, R@2, R@4, R@8, MAP@R, NMI, F1, verify_acc,
TAR@FAR1e-3, one_shot_acc (:func:`gfl_det.reid_eval.reid_metrics` over the detections matched to
ground truth), ``matched`` (how many) and ``identities``; on a two-view set
(``MultiViewDataset``) also ``two_view_R@1`` (a matched detection's nearest detection among the
other views' detections of every image is its counterpart) and ``two_view_R@1_same_image``
(among its own image's other view). The ground truth comes with the batch (``Targets`` with
``ids``, in the view's own frame, so flipped or rescaled views match their own detections).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger

from ..reid_eval import match_to_gt, reid_metrics, two_view_recall
from .registry import METRICS

__all__ = ['ReIDMetric']


@METRICS.register_module(name='ReIDMetric')
class ReIDMetric(BaseMetric):
    """Args:
        ref_score_thr: the two-view references are the other views' detections scoring at least
            this (the queries are the matched detections, any score).
        seed: of the random choices (verification pairs, k-means, the one-shot gallery).
    """

    default_prefix = 'reid'

    def __init__(self, ref_score_thr: float = 0.3, seed: int = 0, collect_device: str = 'cpu',
                 prefix: str | None = None, **unused: Any):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.ref_score_thr, self.seed = float(ref_score_thr), int(seed)

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        targets, metas = data_batch['targets'], data_batch['metas']
        for i, p in enumerate(data_samples):
            r = {'has_ids': targets.ids is not None, 'has_emb': 'embeddings' in p}
            if r['has_ids'] and r['has_emb'] and not p.get('load_failed'):
                valid = targets.valid[i]
                sw, sh = metas[i]['scale_factor'][:2]  # the detections are in original-image pixels
                gt = targets.boxes[i][valid] / torch.tensor([sw, sh, sw, sh], dtype=torch.float32)
                matched, overlapping = match_to_gt(p['bboxes'], p['scores'], gt, targets.ids[i][valid])
                keep = ((matched >= 0) | (p['scores'].cpu() >= self.ref_score_thr)).numpy()
                r.update(emb=p['embeddings'].detach().cpu().float().numpy()[keep],
                         matched=matched.numpy()[keep], overlapping=overlapping.numpy()[keep],
                         image=int(metas[i]['img_id']), view=int(metas[i].get('view', 0)))
            self.results.append(r)

    def compute_metrics(self, results: list) -> dict:
        logger = MMLogger.get_current_instance()
        if not all(r['has_emb'] for r in results):
            logger.warning('ReIDMetric: the model outputs no embeddings (no bbox_head.embed): nothing to measure')
            return {}
        if not all(r['has_ids'] for r in results):
            logger.warning("ReIDMetric: the evaluation set has no identities (CocoDataset(identities='instance_id'), "
                           'or MultiViewDataset): nothing to measure')
            return {}
        results = [r for r in results if 'emb' in r]
        cat = {k: torch.from_numpy(np.concatenate([r[k] for r in results])) for k in ('emb', 'matched', 'overlapping')}
        n = [len(r['matched']) for r in results]
        image = torch.tensor(np.repeat([r['image'] for r in results], n))
        view = torch.tensor(np.repeat([r['view'] for r in results], n))
        m = cat['matched'] >= 0
        out = reid_metrics(cat['emb'][m], cat['matched'][m], seed=self.seed)
        out.update(matched=float(m.sum()), identities=float(len(torch.unique(cat['matched'][m]))))
        if bool((view > 0).any()):
            for key, same in (('two_view_R@1', False), ('two_view_R@1_same_image', True)):
                out[key] = two_view_recall(cat['emb'], cat['matched'], cat['overlapping'], image, view, same)
        logger.info('reid (detections matched to gt at IoU >= 0.5): '
                    + '  '.join(f'{k} {v:.4f}' for k, v in out.items()))
        return out
