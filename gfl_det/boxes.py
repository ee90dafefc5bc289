"""Box utilities. Boxes are xyxy in absolute pixels everywhere inside gfl_det.

Shape legend: N, M boxes; ``...`` any leading batch dimensions.
The IoU/GIoU formulas follow mmdet's ``bbox_overlaps`` operation for operation, so that
results agree bit for bit with MMDetection in float32 (ATSS thresholds compare IoUs with
their mean + std, where a last-bit difference could flip an assignment).
"""
from __future__ import annotations

import torch
from torch import Tensor


def box_area(b: Tensor) -> Tensor:
    w, h = (b[..., 2:] - b[..., :2]).unbind(-1)
    return w * h


def aligned_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of a[i] with b[i]: (..., 4), (..., 4) -> (...)."""
    w, h = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0).unbind(-1)
    overlap = w * h
    union = box_area(a) + box_area(b) - overlap
    return overlap / union.clamp(min=eps)


def aligned_giou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalised IoU of a[i] with b[i]: (..., 4), (..., 4) -> (...)."""
    a_lt, a_rb, b_lt, b_rb = a[..., :2], a[..., 2:], b[..., :2], b[..., 2:]
    w, h = (torch.min(a_rb, b_rb) - torch.max(a_lt, b_lt)).clamp(min=0).unbind(-1)
    overlap = w * h
    union = (box_area(a) + box_area(b) - overlap).clamp(min=eps)
    ious = overlap / union
    enclose_w, enclose_h = (torch.max(a_rb, b_rb) - torch.min(a_lt, b_lt)).clamp(min=0).unbind(-1)
    enclose_area = (enclose_w * enclose_h).clamp(min=eps)
    return ious - (enclose_area - union) / enclose_area


def distance2bbox(points: Tensor, distance: Tensor, max_shape: Tensor | None = None) -> Tensor:
    """(cx, cy) and (left, top, right, bottom) distances -> xyxy boxes.

    points (..., 2), distance (..., 4). ``max_shape`` (..., 2) = (h, w) clips x to [0, w] and
    y to [0, h] (broadcast against the boxes).
    """
    boxes = torch.cat([points - distance[..., :2], points + distance[..., 2:]], -1)
    if max_shape is not None:
        wh = max_shape.to(boxes.dtype).flip(-1)  # (..., 2) w, h
        boxes = torch.min(boxes.clamp(min=0), torch.cat([wh, wh], -1))
    return boxes


def bbox2distance(points: Tensor, boxes: Tensor, max_dis: float | None = None, eps: float = 0.1) -> Tensor:
    """Inverse of distance2bbox: (..., 2), (..., 4) -> (..., 4), optionally clamped to [0, max_dis - eps]."""
    d = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], -1)
    if max_dis is not None:
        d = d.clamp(min=0, max=max_dis - eps)
    return d
