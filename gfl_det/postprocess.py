"""Inference post-processing: per-level top-k, integral decode, clip, rescale
(:func:`gfl_candidates`), then class-aware NMS (:func:`batched_class_nms`).

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

import itertools
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torchvision
from torch import Tensor

from .boxes import distance2bbox
from .host import host_tensor
from .priors import Priors


def flatten_cls(cls_scores: list[Tensor]) -> Tensor:
    """[(B, C, H_l, W_l)] -> (B, A, C) (one concatenation, transposed into a contiguous tensor)."""
    return torch.cat([c.flatten(2) for c in cls_scores], 2).transpose(1, 2).contiguous()


def flatten_reg(bbox_preds: list[Tensor], reg_max: int) -> Tensor:
    """[(B, 4(R+1), H_l, W_l)] -> (B, A, 4, R + 1): a permuted view of one concatenation (index it,
    or make it contiguous before elementwise work: its last dimension has stride A)."""
    return torch.cat([r.flatten(2) for r in bbox_preds], 2).unflatten(1, (4, reg_max + 1)).permute(0, 3, 1, 2)


def gather_prior_rows(levels: Sequence[Tensor], b: Tensor, a: Tensor,
                      read: Optional[Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = None) -> Tensor:
    """Rows (b_i, a_i) of the per-level maps [(B, D, H_l, W_l)] as (N, D), a_i a prior index over
    all levels. Reads only the N rows (no (B, A, D) copy of the maps); differentiable.
    ``read(map, b, y, x) -> (n, D')`` replaces the plain read ``map[b, :, y, x]`` (e.g. a small
    network over each row's neighbourhood); rows come back in the order of (b, a)."""
    sizes = [e.shape[-2] * e.shape[-1] for e in levels]
    ends = list(itertools.accumulate(sizes))  # each level's end among all A priors
    level = torch.bucketize(a, host_tensor(ends, a.device), right=True)  # (N,) the level of each row
    # the rows grouped by level, (b, a) order kept inside each: one host read (the group sizes)
    order = level.argsort(stable=True)
    counts = torch.bincount(level, minlength=len(levels)).tolist()
    parts = []
    for e, sel, end, size in zip(levels, order.split(counts), ends, sizes):
        j = a[sel] - (end - size)  # index inside the level, y * W_l + x
        y, x = j // e.shape[-1], j % e.shape[-1]
        parts.append(e[b[sel], :, y, x] if read is None else read(e, b[sel], y, x))  # (n_l, D)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(parts)[inverse]


def integral(logits: Tensor) -> Tensor:
    """(..., R + 1) distribution logits -> (...) expected bin: sum_i softmax(logits)_i * i (GFL's
    box edge; the one definition the loss, the decoder and the export use)."""
    R = logits.shape[-1] - 1
    bins = torch.arange(R + 1, dtype=torch.float32, device=logits.device)
    return torch.nn.functional.linear(logits.float().softmax(-1), bins)


class Candidates(NamedTuple):
    """What post-processing has before NMS: static shapes (B, N), N = sum_l min(nms_pre, A_l C),
    fixed by the batch's shape alone (what a CUDA graph needs)."""

    boxes: Tensor  # (B, N, 4) decoded, clipped, rescaled
    scores: Tensor  # (B, N) the pair's score (-1 where <= score_thr)
    labels: Tensor  # (B, N) int64 class
    priors: Tensor  # (B, N) int64 prior among all A, (level, y, x) order
    keep: Tensor  # (B, N) bool: above score_thr and larger than min_bbox_size


def inverse_scale(scale_factors: Sequence[Sequence[float]], device: torch.device | str) -> Tensor:
    """(B, 2) float32 1 / scale_factor on ``device``, as mmdet computes it (the reciprocal in
    double, then rounded to float32), made on the host and copied without a sync (gfl_det/host.py)."""
    return host_tensor([[1.0 / float(f) for f in sf] for sf in scale_factors], device, torch.float32)


def gfl_candidates(cls_scores: list[Tensor], bbox_preds: list[Tensor], priors: Priors, img_shapes: Tensor,
                   inv_scale: Tensor | None, *, nms_pre: int = 1000, score_thr: float = 0.05,
                   min_bbox_size: float = 0.0) -> Candidates:
    """Everything before NMS, with shapes fixed by the batch's shape: per level the best
    ``nms_pre`` (prior, class) pairs, decoded, clipped to ``img_shapes`` (B, 2) (h, w), multiplied
    by ``inv_scale`` (B, 2) (1 / w_scale, 1 / h_scale; None: input pixels), and which of them
    pass ``score_thr`` and ``min_bbox_size``. No host synchronisation, no host data: a CUDA
    graph can replay it (gfl_det/fast/cuda_graph.py)."""
    B, C = cls_scores[0].shape[:2]
    R = bbox_preds[0].shape[1] // 4 - 1
    scores = flatten_cls(cls_scores).float().sigmoid()  # (B, A, C)
    # per level (mmdet's nms_pre is per level) the best (prior, class) pairs, best first
    tops, flat, start = [], [], 0
    for n in priors.num_level:
        top, ti = scores[:, start:start + n].flatten(1).topk(min(nms_pre, n * C), dim=1)  # (B, k_l)
        tops.append(top)
        flat.append(ti + start * C)
        start += n
    top, flat = torch.cat(tops, 1), torch.cat(flat, 1)  # (B, N) every level's candidates
    prior, labels = flat // C, flat % C  # (B, N) the prior among all A, its class
    logits = flatten_reg(bbox_preds, R)[torch.arange(B, device=prior.device)[:, None], prior]  # (B, N, 4, R+1)
    dist = integral(logits) * priors.strides[prior, None]  # (B, N, 4) in input pixels
    boxes = distance2bbox(priors.points[prior], dist, img_shapes[:, None, :])  # (B, N, 4)
    scores = torch.where(top > score_thr, top, -1.0)
    if inv_scale is not None:
        # mmdet multiplies by the reciprocal of the scale factor (computed in double)
        boxes = boxes * torch.cat([inv_scale, inv_scale], 1)[:, None, :]
    wh = boxes[..., 2:] - boxes[..., :2]
    keep = (scores > score_thr) & (wh > min_bbox_size).all(-1)
    return Candidates(boxes, scores, labels, prior, keep)


def batched_class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, priors: Tensor, keep: Tensor,
                      num_classes: int, iou_threshold: float, max_per_img: int) -> list[dict[str, Tensor]]:
    """One NMS call for the whole batch: per (image, class) groups via an exact float64 offset.
    boxes (B, N, 4), scores / labels / priors / keep (B, N) (:class:`Candidates`).

    Returns per image {'bboxes' (k, 4), 'scores' (k,), 'labels' (k,), 'prior_idx' (k,)}, best
    first, at most ``max_per_img``; ``prior_idx`` is each detection's prior among the A of all
    levels, in (level, y, x) order: where per-location outputs (an embedding) are read for it."""
    B, N = scores.shape
    sel = keep.flatten().nonzero().squeeze(1)  # host read 1 of 3 (then the max_per_img cut, the counts)
    b, s, l, p = boxes.reshape(-1, 4)[sel], scores.flatten()[sel], labels.flatten()[sel], priors.flatten()[sel]
    im = sel // N  # each candidate's image
    if sel.numel():
        bd = b.double()
        group = (im * num_classes + l).double()
        span = bd.max() - bd.min().clamp(max=0.0) + 1  # a tensor: no read on the host
        kept = torchvision.ops.nms(bd + (group * span)[:, None], s.double(), iou_threshold)
        # kept is in decreasing score order; a stable sort by image keeps that order per image
        kept = kept[torch.sort(im[kept], stable=True).indices]
        ik = im[kept]
        first = torch.searchsorted(ik, ik, right=False)
        rank = torch.arange(ik.numel(), device=ik.device) - first
        kept = kept[rank < max_per_img]
        b, s, l, im, p = b[kept], s[kept], l[kept], im[kept], p[kept]
    counts = torch.bincount(im, minlength=B).tolist()  # per-image sizes, for the split
    return [dict(bboxes=bb, scores=ss, labels=ll, prior_idx=pp)
            for bb, ss, ll, pp in zip(b.split(counts), s.split(counts), l.split(counts), p.split(counts))]
