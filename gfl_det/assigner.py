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

How it is vectorised (no loop over images, boxes, priors or levels):
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
    A, k = priors.points.shape[0], topk
    gt_boxes = torch.where(gt_valid[..., None], gt_boxes, gt_boxes.new_zeros(()))
    centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2.0  # (B, G, 2) x, y
    extent = priors.valid_extent(pad_shapes)[:, None, :, None, :]  # (B, 1, L, 1, 2) valid rows, cols
    win = torch.arange(k + 1, device=device)
    shift = max(1, ((k + 1) ** 2 - 1).bit_length())
    win_slot = torch.arange((k + 1) ** 2, device=device)  # window slots in prior order
    inf_key = 0x7F800000 << shift  # float32 +inf's bit pattern: the key of an invalid slot

    # every level at once: the (k+1) x (k+1) window of grid cells around each gt centre, its
    # first column / row clamped into the image's valid part of the level
    s = priors.level_stride[:, None]  # (L, 1)
    first = torch.floor(centre[:, :, None, :] / s).long() - k // 2  # (B, G, L, 2) x0, y0
    first = torch.minimum(first.clamp(min=0), (extent.flip(-1)[..., 0, :] - (k + 1)).clamp(min=0))
    cells = first[..., None, :] + win[:, None]  # (B, G, L, k+1, 2) columns, rows
    cols, rows = cells.unbind(-1)
    ok = ((rows < extent[..., 0])[..., :, None] & (cols < extent[..., 1])[..., None, :]).flatten(3)  # (B, G, L, W)
    width = priors.level_hw[:, 1, None, None]  # (L, 1, 1)
    idx = (rows[..., :, None] * width + cols[..., None, :]).flatten(3)  # (B, G, L, W), prior order
    idx = torch.where(ok, idx, 0) + priors.level_start[:, None]  # index among all A priors
    d = priors.points[idx] - centre[:, :, None, None, :]  # (B, G, L, W, 2)
    dist = torch.where(ok, (d * d).sum(-1).sqrt(), float("inf"))
    # the k smallest distances, ties to the earlier window slot (= lower prior index), as a
    # stable sort would give: a non-negative float's bit pattern orders as an integer, so
    # (bits << shift | slot) is a unique int64 key and topk picks exactly the stable order
    # (topk over 100 keys is ~15x faster than a stable sort of them on the CPU)
    key = (dist.to(torch.float32).view(torch.int32).long() << shift) | win_slot
    key, order = key.topk(k, dim=-1, largest=False, sorted=True)  # (B, G, L, k)
    cand_idx = idx.gather(-1, order).flatten(2)  # (B, G, K), level by level
    cand_ok = (key < inf_key).flatten(2) & gt_valid[..., None]

    # IoU of the candidates' anchor boxes with their gt (anchor box first, as mmdet)
    pts = priors.points[cand_idx]  # (B, G, K, 2)
    half = priors.strides[cand_idx, None] * (octave_base_scale / 2)
    anchors = torch.cat([pts - half, pts + half], -1)  # (B, G, K, 4), as Priors.boxes
    iou = aligned_iou(anchors, gt_boxes[:, :, None, :])  # (B, G, K)
    okf = cand_ok.to(iou.dtype)
    n = okf.sum(-1, keepdim=True)
    mean = (iou * okf).sum(-1, keepdim=True) / n
    var = (((iou - mean) * okf) ** 2).sum(-1, keepdim=True) / (n - 1)
    thr = mean + var.sqrt()
    gt = gt_boxes[:, :, None, :]  # (B, G, 1, 4)
    inside = torch.cat([pts - gt[..., :2], gt[..., 2:] - pts], -1).amin(-1) > 0.01
    is_pos = cand_ok & (iou >= thr) & inside

    # a prior positive for several gts goes to the gt of largest IoU (lowest index on ties): one
    # amax over int64 keys (IoU bits << 32 | G - 1 - gt), unique per (prior, gt) as the distance
    # keys above, so the winning slot is the one whose key is its prior's maximum
    flip_g = G - 1 - torch.arange(G, device=device)[:, None]  # (G, 1)
    key = torch.where(is_pos, (iou.view(torch.int32).long() << 32) | flip_g, -1).flatten(1)  # (B, G K)
    slots = cand_idx.flatten(1)  # (B, G K)
    best = torch.full((B, A), -1, device=device, dtype=torch.long).scatter_reduce_(1, slots, key, "amax")  # (B, A)
    pos = (key >= 0) & (key == best.gather(1, slots))
    assigned = torch.where(best >= 0, G - 1 - (best & 0xFFFFFFFF), -1)  # (B, A)
    return Assignment(cand_idx, cand_ok, iou, pos.view_as(iou), assigned, pos.sum(1))
