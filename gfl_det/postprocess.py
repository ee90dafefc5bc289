"""Inference post-processing: per-level top-k, integral decode, clip, rescale, class-aware NMS.

Legend: B images, A_l priors of level l, A = sum A_l, C classes, R = reg_max, N candidates.
Batched over images; no host synchronisation until the single NMS call of the batch.
Behaviour matches MMDetection's ``GFLHead.predict_by_feat`` + ``_bbox_post_process``:
per level keep the (prior, class) pairs with score > score_thr, best ``nms_pre`` first; decode
(prior point -/+ distance * stride), clip to img_shape, rescale to the original image by
multiplying with 1 / scale_factor, drop boxes of width or height <= min_bbox_size, class-aware
NMS, best ``max_per_img``.
Deviation: mmdet's class-aware NMS shifts boxes by ``label * (max + 1)`` in float32, which
rounds coordinates by up to ~0.01 px for 80 classes; we shift in float64 (exact), i.e. true
per-class NMS. Decisions can differ only for IoUs within rounding of the threshold.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torchvision
from torch import Tensor

from .boxes import distance2bbox


def flatten_cls(cls_scores: list[Tensor]) -> Tensor:
    """[(B, C, H_l, W_l)] -> (B, A, C)."""
    return torch.cat([c.permute(0, 2, 3, 1).reshape(c.shape[0], -1, c.shape[1]) for c in cls_scores], 1)


def flatten_reg(bbox_preds: list[Tensor], reg_max: int) -> Tensor:
    """[(B, 4(R+1), H_l, W_l)] -> (B, A, 4, R + 1)."""
    return torch.cat([r.permute(0, 2, 3, 1).reshape(r.shape[0], -1, 4, reg_max + 1) for r in bbox_preds], 1)


def gather_prior_rows(levels: Sequence[Tensor], b: Tensor, a: Tensor) -> Tensor:
    """Rows (b_i, a_i) of the per-level maps [(B, D, H_l, W_l)] as (N, D), a_i a prior index over
    all levels. Reads only the N rows (no (B, A, D) copy of the maps); differentiable."""
    sizes = torch.tensor([e.shape[-2] * e.shape[-1] for e in levels], device=a.device)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])  # (L + 1,)
    level = torch.bucketize(a, starts[1:], right=True)  # (N,) the level of each row
    parts, where = [], []
    for i, e in enumerate(levels):
        sel = (level == i).nonzero().squeeze(1)
        j = a[sel] - starts[i]  # index inside the level, y * W_l + x
        parts.append(e[b[sel], :, j // e.shape[-1], j % e.shape[-1]])  # (n_l, D)
        where.append(sel)
    where = torch.cat(where)
    inverse = torch.empty_like(where)
    inverse[where] = torch.arange(len(where), device=where.device)
    return torch.cat(parts)[inverse]


def integral(logits: Tensor) -> Tensor:
    """(..., R + 1) distribution logits -> (...) expected bin: sum_i softmax(logits)_i * i (GFL's
    box edge; the one definition the loss, the decoder and the export use)."""
    R = logits.shape[-1] - 1
    bins = torch.arange(R + 1, dtype=torch.float32, device=logits.device)
    return torch.nn.functional.linear(logits.float().softmax(-1), bins)


def gfl_predict(cls_scores: list[Tensor], bbox_preds: list[Tensor], points: list[Tensor], strides: list[int],
                img_shapes: Tensor, scale_factors: Tensor | None, *, nms_pre: int = 1000,
                score_thr: float = 0.05, iou_threshold: float = 0.6, max_per_img: int = 100,
                min_bbox_size: float = 0.0) -> list[dict[str, Tensor]]:
    """Detections for a batch.

    Args:
        cls_scores / bbox_preds: head outputs per level.
        points: per level (A_l, 2) prior points.
        img_shapes: (B, 2) (h, w) to clip to.
        scale_factors: (B, 2) (w_scale, h_scale) to undo (None: stay in input coordinates).
    Returns: per image {'bboxes' (k, 4), 'scores' (k,), 'labels' (k,), 'prior_idx' (k,)}, best
    first; ``prior_idx`` is each detection's prior among the A of all levels, in (level, y, x)
    order: where per-location outputs (an embedding) are read for it.
    """
    B, C = cls_scores[0].shape[:2]
    R = bbox_preds[0].shape[1] // 4 - 1
    all_boxes, all_scores, all_labels, all_priors = [], [], [], []
    start = 0
    for cls, reg, pts, s in zip(cls_scores, bbox_preds, points, strides):
        scores = cls.permute(0, 2, 3, 1).reshape(B, -1).float().sigmoid()  # (B, A_l * C)
        k = min(nms_pre, scores.shape[1])
        top, ti = scores.topk(k, dim=1)  # (B, k) best first
        prior = ti // C
        labels = ti % C
        reg = reg.permute(0, 2, 3, 1).reshape(B, -1, 4, R + 1)
        logits = reg.gather(1, prior[..., None, None].expand(-1, -1, 4, R + 1))  # (B, k, 4, R+1)
        dist = integral(logits) * s
        boxes = distance2bbox(pts[prior], dist, img_shapes[:, None, :])
        all_boxes.append(boxes)
        all_scores.append(torch.where(top > score_thr, top, torch.full_like(top, -1.0)))
        all_labels.append(labels)
        all_priors.append(prior + start)
        start += pts.shape[0]
    boxes = torch.cat(all_boxes, 1)  # (B, N, 4)
    scores = torch.cat(all_scores, 1)
    labels = torch.cat(all_labels, 1)
    priors = torch.cat(all_priors, 1)
    if scale_factors is not None:
        # mmdet multiplies by the reciprocal of the scale factor (computed in double)
        inv = (1.0 / scale_factors.double()).float().to(boxes.device)
        boxes = boxes * torch.cat([inv, inv], 1)[:, None, :]
    wh = boxes[..., 2:] - boxes[..., :2]
    keep = (scores > score_thr) & (wh > min_bbox_size).all(-1)
    return batched_class_nms(boxes, scores, labels, priors, keep, C, iou_threshold, max_per_img)


def batched_class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, priors: Tensor, keep: Tensor,
                      num_classes: int, iou_threshold: float, max_per_img: int) -> list[dict[str, Tensor]]:
    """One NMS call for the whole batch: per (image, class) groups via an exact float64 offset.
    boxes (B, N, 4), scores / labels / priors / keep (B, N)."""
    B, N = scores.shape
    img = torch.arange(B, device=boxes.device)[:, None].expand(B, N)
    sel = keep.flatten().nonzero().squeeze(1)  # the one host sync of post-processing
    b, s, l, im = boxes.reshape(-1, 4)[sel], scores.flatten()[sel], labels.flatten()[sel], img.flatten()[sel]
    p = priors.flatten()[sel]
    if sel.numel():
        bd = b.double()
        group = (im * num_classes + l).double()
        span = bd.max() - min(bd.min(), 0.0) + 1
        kept = torchvision.ops.nms(bd + (group * span)[:, None], s.double(), iou_threshold)
        # kept is in decreasing score order; a stable sort by image keeps that order per image
        kept = kept[torch.sort(im[kept], stable=True).indices]
        ik = im[kept]
        first = torch.searchsorted(ik, ik, right=False)
        rank = torch.arange(ik.numel(), device=ik.device) - first
        kept = kept[rank < max_per_img]
        b, s, l, im, p = b[kept], s[kept], l[kept], im[kept], p[kept]
    counts = torch.bincount(im, minlength=B).tolist()
    return [dict(bboxes=bb, scores=ss, labels=ll, prior_idx=pp)
            for bb, ss, ll, pp in zip(b.split(counts), s.split(counts), l.split(counts), p.split(counts))]
