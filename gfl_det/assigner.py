"""ATSS (Zhang et al. 2020) assignment, batched over the images of a batch.

Legend: B images, G gt boxes per image (padded; ``gt_valid`` marks real ones), A priors,
L levels, k = topk candidates per level, K = L * k candidate slots per gt.

Behaviour matches MMDetection's ``ATSSAssigner`` (topk 9) applied per image to the valid
priors only:
  1. per level, the k priors whose centres are nearest (Euclidean) to the gt centre;
  2. threshold per gt = mean + unbiased std of the candidates' IoUs (anchor box vs gt);
  3. a candidate is positive iff IoU >= threshold and its centre lies inside the gt by more
     than 0.01 px on all four sides;
  4. a prior positive for several gts takes the one of largest IoU (lowest gt index on ties).

How it is vectorised (no loop over images, boxes or priors; one short loop over levels):
priors form a regular grid per level and an image's valid priors a rectangle of it, so the
k nearest priors to a point lie among the k nearest *columns* times the k nearest *rows*
(any prior outside that set has k priors in its own row -- or column -- that are strictly
nearer). The k nearest columns to x are a contiguous run inside the k + 1 columns starting
at floor(x / s) - k // 2, clamped into the valid range. So each (gt, level) needs only a
(k+1) x (k+1) window of distances, and IoUs are computed for the K candidates only.
Ties in distance go to the lower prior index (the order of a stable sort over the window,
enumerated in prior order, taken with topk over unique integer keys); mmdet uses ``topk``,
whose choice among exact ties is unspecified.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .boxes import aligned_iou
from .priors import Priors


@dataclass
class Assignment:
    cand_idx: Tensor   # (B, G, K) long, prior index of each candidate slot (clamped to [0, A) where unused)
    cand_ok: Tensor    # (B, G, K) bool, slot holds a real candidate (valid prior, valid gt)
    cand_iou: Tensor   # (B, G, K) IoU of the slot's anchor box with the gt
    pos: Tensor        # (B, G, K) bool, the slot's prior is assigned to this gt (one slot per positive prior)
    assigned: Tensor   # (B, A) long, index of the assigned gt, -1 for negatives
    num_pos: Tensor    # (B,) long


@torch.no_grad()
def atss_assign(priors: Priors, gt_boxes: Tensor, gt_valid: Tensor, pad_shapes: Tensor,
                topk: int = 9, octave_base_scale: float = 8.0) -> Assignment:
    """Assign priors to gt boxes for a whole batch.

    Args:
        priors: priors of all levels (see ``gfl_det.priors.make_priors``).
        gt_boxes: (B, G, 4) xyxy input pixels; padded entries may hold anything finite.
        gt_valid: (B, G) bool.
        pad_shapes: (B, 2) each image's own padded (h, w); priors beyond it are ignored.
    """
    B, G = gt_valid.shape
    device = gt_boxes.device
    A = priors.points.shape[0]
    gt_boxes = torch.where(gt_valid[..., None], gt_boxes, gt_boxes.new_zeros(()))
    gcx = (gt_boxes[..., 0] + gt_boxes[..., 2]) / 2.0  # (B, G)
    gcy = (gt_boxes[..., 1] + gt_boxes[..., 3]) / 2.0
    rows_v, cols_v = priors.valid_rows_cols(pad_shapes)  # (B, L)
    win = torch.arange(topk + 1, device=device)
    win_slot = torch.arange((topk + 1) ** 2, device=device)  # window slots in prior order
    shift = max(1, ((topk + 1) ** 2 - 1).bit_length())
    inf_key = 0x7F800000 << shift  # float32 +inf's bit pattern: the key of an invalid slot
    idx_levels, ok_levels = [], []
    offset = 0
    for lvl, ((h, w), s) in enumerate(zip(priors.level_sizes, priors.level_strides)):
        nr = rows_v[:, lvl, None]  # (B, 1)
        nc = cols_v[:, lvl, None]
        x0 = torch.floor(gcx / s).long() - topk // 2
        y0 = torch.floor(gcy / s).long() - topk // 2
        x0 = torch.minimum(x0.clamp(min=0), (nc - (topk + 1)).clamp(min=0))  # (B, G)
        y0 = torch.minimum(y0.clamp(min=0), (nr - (topk + 1)).clamp(min=0))
        cols = x0[..., None] + win  # (B, G, k+1)
        rows = y0[..., None] + win
        ok = (rows < nr[..., None])[..., :, None] & (cols < nc[..., None])[..., None, :]  # (B, G, k+1, k+1)
        idx = (rows[..., :, None] * w + cols[..., None, :]).flatten(2)  # (B, G, (k+1)^2), prior order
        ok = ok.flatten(2)
        idx = torch.where(ok, idx, torch.zeros_like(idx)) + offset
        pts = priors.points[idx]  # (B, G, W, 2)
        dx = pts[..., 0] - gcx[..., None]
        dy = pts[..., 1] - gcy[..., None]
        dist = (dx * dx + dy * dy).sqrt()
        dist = torch.where(ok, dist, torch.full_like(dist, float("inf")))
        # the k smallest distances, ties to the earlier window slot (= lower prior index), as a
        # stable sort would give: a non-negative float's bit pattern orders as an integer, so
        # (bits << shift | slot) is a unique int64 key and topk picks exactly the stable order
        # (topk over 100 keys is ~15x faster than a stable sort of them on the CPU)
        key = (dist.to(torch.float32).view(torch.int32).long() << shift) | win_slot
        key, order = key.topk(topk, dim=-1, largest=False, sorted=True)
        idx_levels.append(idx.gather(-1, order))
        ok_levels.append(key < inf_key)
        offset += h * w
    cand_idx = torch.cat(idx_levels, -1)  # (B, G, K)
    cand_ok = torch.cat(ok_levels, -1) & gt_valid[..., None]

    # IoU of the candidates' anchor boxes with their gt (anchor box first, as mmdet)
    anchors = priors.boxes(octave_base_scale)[cand_idx]  # (B, G, K, 4)
    iou = aligned_iou(anchors, gt_boxes[:, :, None, :])  # (B, G, K)
    okf = cand_ok.to(iou.dtype)
    n = okf.sum(-1, keepdim=True)
    mean = (iou * okf).sum(-1, keepdim=True) / n
    var = (((iou - mean) * okf) ** 2).sum(-1, keepdim=True) / (n - 1)
    thr = mean + var.sqrt()
    pts = priors.points[cand_idx]  # (B, G, K, 2)
    inside = torch.stack([pts[..., 0] - gt_boxes[..., None, 0], pts[..., 1] - gt_boxes[..., None, 1],
                          gt_boxes[..., None, 2] - pts[..., 0], gt_boxes[..., None, 3] - pts[..., 1]],
                         -1).amin(-1) > 0.01
    is_pos = cand_ok & (iou >= thr) & inside

    # a prior positive for several gts goes to the gt of largest IoU (lowest index on ties)
    flat = (torch.arange(B, device=device)[:, None, None] * A + cand_idx).flatten()
    neg_inf = torch.full((), float("-inf"), device=device, dtype=iou.dtype)
    best = torch.full((B * A,), float("-inf"), device=device, dtype=iou.dtype)
    best.scatter_reduce_(0, flat, torch.where(is_pos, iou, neg_inf).flatten(), "amax")
    win_ = is_pos & (iou == best[flat].view_as(iou))
    gidx = torch.arange(G, device=device)[None, :, None].expand_as(cand_idx)
    bestg = torch.full((B * A,), G, device=device, dtype=torch.long)
    bestg.scatter_reduce_(0, flat, torch.where(win_, gidx, torch.full_like(gidx, G)).flatten(), "amin")
    pos = win_ & (gidx == bestg[flat].view_as(gidx))
    assigned = torch.where(bestg < G, bestg, torch.full_like(bestg, -1)).view(B, A)
    return Assignment(cand_idx, cand_ok, iou, pos, assigned, pos.flatten(1).sum(1))
