"""Re-identification metrics of a detector's embeddings, over its detections matched to ground truth.

Legend: k detections of an image, g its gt boxes, N matched detections of a whole set, D the
embedding dimension.

Matching (per image, as COCO matches): detections best score first, each takes the gt of highest
IoU that is >= 0.5 and not taken yet -- so each gt object gives at most one detection, which
carries that gt's identity. Over all matched detections of the set (:func:`reid_metrics`):

    R@1 R@2 R@4 R@8   a detection's K nearest other detections hold one of its identity
    MAP@R             mean average precision at R (R = the other detections of its identity)
    NMI F1            k-means with k = identities vs the identities
    verify_acc        same / different by a distance threshold, 10-fold (LFW protocol)
    TAR@FAR1e-3       same pairs accepted where 0.1 % of different pairs are
    one_shot_acc      one random detection per identity enrolled, every other one labelled by
                      its nearest enrolled detection (one-shot identification); the mean of
                      10 random enrolments

(:mod:`gfl_det.metric.evaluation`'s functions.) Two views of each image (``MultiViewDataset``):
:func:`two_view_recall` -- for each matched detection, is its nearest detection among the other
views' detections (every one scoring >= ``ref_score_thr``; those overlapping a gt by IoU >= 0.5
carry its identity, the rest none) its counterpart?
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from .metric.evaluation import clustering_metrics, retrieval_metrics, verification_metrics, verification_pairs

__all__ = ['REID_KEYS', 'match_to_gt', 'one_shot_accuracy', 'reid_metrics', 'two_view_recall']

REID_KEYS = ('R@1', 'R@2', 'R@4', 'R@8', 'MAP@R', 'NMI', 'F1', 'verify_acc', 'TAR@FAR1e-3', 'one_shot_acc')
IOU_THR = 0.5
ONE_SHOT_TRIALS = 10  # random enrolments one_shot_acc averages over


def match_to_gt(boxes: Tensor, scores: Tensor, gt_boxes: Tensor, gt_ids: Tensor,
                iou_thr: float = IOU_THR) -> tuple[Tensor, Tensor]:
    """One image: (matched (k,) identity of each detection's gt, one detection per gt, -1 for the
    rest; overlapping (k,) the identity of the gt each detection overlaps most when IoU >= iou_thr,
    duplicates included, else -1). boxes (k, 4), scores (k,), gt_boxes (g, 4), gt_ids (g,)."""
    k = len(boxes)
    matched = torch.full((k,), -1, dtype=torch.long)
    overlapping = matched.clone()
    if k == 0 or len(gt_boxes) == 0:
        return matched, overlapping
    iou = box_iou(boxes.float().cpu(), gt_boxes.float().cpu())  # (k, g)
    best, best_gt = iou.max(1)
    overlapping = torch.where(best >= iou_thr, gt_ids.cpu()[best_gt], -1)
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for d in scores.float().cpu().argsort(descending=True, stable=True).tolist():  # k <= max_per_img
        cand = iou[d].masked_fill(taken, -1.0)
        j = int(cand.argmax())
        if cand[j] >= iou_thr:
            taken[j] = True
            matched[d] = gt_ids[j]
    return matched, overlapping


def one_shot_accuracy(emb: Tensor, ids: Tensor, seed: int = 0, trials: int = ONE_SHOT_TRIALS) -> float:
    """One random example per identity enrolled (a gallery); every other example is identified
    as its nearest gallery entry's identity: the fraction right, averaged over ``trials`` random
    enrolments (NaN without such queries). One draw alone is a noisy estimate: with 20 identities
    a single badly chosen example (occluded, blurred) moves it by several points."""
    g = torch.Generator().manual_seed(seed)
    emb = emb.float()
    accs = []
    for _ in range(trials):
        perm = torch.randperm(len(ids), generator=g)
        order = perm[ids[perm].sort(stable=True).indices]  # grouped by identity, random inside
        s = ids[order]
        first = torch.ones_like(s, dtype=torch.bool)
        first[1:] = s[1:] != s[:-1]
        gallery, queries = order[first], order[~first]
        if len(queries) == 0:
            return math.nan
        nearest = torch.cdist(emb[queries], emb[gallery]).argmin(1)  # (queries,) into the gallery
        accs.append((ids[gallery][nearest] == ids[queries]).double().mean())
    return torch.stack(accs).mean().item()


def reid_metrics(emb: Tensor, ids: Tensor, seed: int = 0) -> dict[str, float]:
    """The :data:`REID_KEYS` of embeddings (N, D) with identities (N,) int64 (NaN where
    undefined: e.g. no identity seen twice)."""
    emb, ids = emb.float().cpu(), ids.long().cpu()
    out = dict.fromkeys(REID_KEYS, math.nan)
    if len(ids) < 2:
        return out
    r = retrieval_metrics(emb, ids)
    out.update({f'R@{k}': v for k, v in r['recall_at_k'].items()}, **{'MAP@R': r['map_at_r']})
    c = clustering_metrics(emb, ids, seed=seed)
    out.update(NMI=c['nmi'], F1=c['f1'])
    dist, same = verification_pairs(emb, ids, seed=seed)
    if bool(same.any()) and bool((~same).any()):
        v = verification_metrics(dist, same, seed=seed)
        out.update(verify_acc=v['accuracy'], **{'TAR@FAR1e-3': v['tar_at_far_1e-3']})
    out['one_shot_acc'] = one_shot_accuracy(emb, ids, seed)
    return out


def two_view_recall(emb: Tensor, matched: Tensor, overlapping: Tensor, image: Tensor, view: Tensor,
                    same_image: bool = False) -> float:
    """R@1 of instance matching between views: every detection with a ``matched`` identity asks
    whether its nearest detection of another view (of any image, or of its own image when
    ``same_image``) ``overlapping``-ly carries that identity. All (N,) over the detections kept;
    NaN without queries."""
    q = (matched >= 0).nonzero().squeeze(1)
    if len(q) == 0:
        return math.nan
    d = torch.cdist(emb[q].float(), emb.float())  # (Q, N)
    other = view[q][:, None] != view[None, :]
    if same_image:
        other &= image[q][:, None] == image[None, :]
    d = d.masked_fill(~other, math.inf)
    nearest = d.argmin(1)
    hit = (overlapping[nearest] == matched[q]) & torch.isfinite(d.min(1).values)
    return hit.double().mean().item()


def as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
