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
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def aligned_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of a[i] with b[i]: (..., 4), (..., 4) -> (...)."""
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - overlap
    return overlap / union.clamp(min=eps)


def aligned_giou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalised IoU of a[i] with b[i]: (..., 4), (..., 4) -> (...)."""
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (box_area(a) + box_area(b) - overlap).clamp(min=eps)
    ious = overlap / union
    enclose_wh = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    enclose_area = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    return ious - (enclose_area - union) / enclose_area


def distance2bbox(points: Tensor, distance: Tensor, max_shape: Tensor | None = None) -> Tensor:
    """(cx, cy) and (left, top, right, bottom) distances -> xyxy boxes.

    points (..., 2), distance (..., 4). ``max_shape`` (..., 2) = (h, w) clips x to [0, w] and
    y to [0, h] (broadcast against the boxes).
    """
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    boxes = torch.stack([x1, y1, x2, y2], -1)
    if max_shape is not None:
        hw = max_shape.to(boxes.dtype)
        upper = torch.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], -1)
        boxes = torch.min(boxes.clamp(min=0), upper)
    return boxes


def bbox2distance(points: Tensor, boxes: Tensor, max_dis: float | None = None, eps: float = 0.1) -> Tensor:
    """Inverse of distance2bbox: (..., 2), (..., 4) -> (..., 4), optionally clamped to [0, max_dis - eps]."""
    d = torch.stack([points[..., 0] - boxes[..., 0], points[..., 1] - boxes[..., 1],
                     boxes[..., 2] - points[..., 0], boxes[..., 3] - points[..., 1]], -1)
    if max_dis is not None:
        d = d.clamp(min=0, max=max_dis - eps)
    return d
