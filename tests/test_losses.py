"""QFL, DFL and GIoU against values worked out by hand (including gradients)."""
import math

import pytest
import torch

from gfl_det.boxes import aligned_giou, aligned_iou, bbox2distance, distance2bbox
from gfl_det.losses import distribution_focal_loss, giou_loss, quality_focal_loss

LN2 = math.log(2)


def test_qfl_positive_value_and_grad():
    # x = 0 -> sigmoid 0.5; y = 1: BCE = ln 2, |y - s|^2 = 0.25 -> 0.25 ln 2
    x = torch.tensor([0.0], requires_grad=True)
    loss = quality_focal_loss(x, torch.tensor([1.0]))
    assert loss.item() == pytest.approx(0.25 * LN2, rel=1e-6)
    loss.sum().backward()
    # d/dx = (s - y) |y - s|^2 + BCE * 2 (y - s)(-s(1 - s)) = -0.5 * 0.25 + ln2 * (-0.25)
    assert x.grad.item() == pytest.approx(-0.125 - 0.25 * LN2, rel=1e-6)


def test_qfl_soft_target():
    # x = ln 3 -> sigmoid 0.75; y = 0.25: BCE = -(0.25 ln .75 + .75 ln .25); factor (0.25 - 0.75)^2
    x = torch.tensor([math.log(3.0)])
    bce = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    assert quality_focal_loss(x, torch.tensor([0.25])).item() == pytest.approx(bce * 0.25, rel=1e-6)
    # the target equal to the prediction gives no loss
    assert quality_focal_loss(x, torch.tensor([0.75])).item() == pytest.approx(0.0, abs=1e-7)


def test_dfl_value_and_grad():
    # two bins, p = [0.25, 0.75]; t = 0.4 -> CE(0) * 0.6 + CE(1) * 0.4
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    loss = distribution_focal_loss(logits, torch.tensor([0.4]))
    assert loss.item() == pytest.approx(0.6 * math.log(4) + 0.4 * -math.log(0.75), rel=1e-6)
    loss.sum().backward()
    # d/dz = p - (0.6 e0 + 0.4 e1)
    assert torch.allclose(logits.grad, torch.tensor([[0.25 - 0.6, 0.75 - 0.4]]), atol=1e-6)


def test_dfl_uniform_and_integer_targets():
    R = 16
    uni = torch.zeros(3, R + 1)
    assert torch.allclose(distribution_focal_loss(uni, torch.tensor([0.0, 7.5, 15.9])),
                          torch.full((3,), math.log(R + 1)), rtol=1e-6)
    # integer target puts all weight on one bin
    logits = torch.randn(5, R + 1)
    t = torch.tensor([0.0, 3.0, 8.0, 12.0, 15.0])
    ce = torch.nn.functional.cross_entropy(logits, t.long(), reduction="none")
    assert torch.allclose(distribution_focal_loss(logits, t), ce, rtol=1e-6)


def test_giou_values():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [1, 1, 3, 4]])
    b = torch.tensor([[1.0, 1, 3, 3], [2, 2, 3, 3], [1, 1, 3, 4]])
    # 1/7 - 2/9;  disjoint: -(9 - 2)/9;  identical: 1
    expected = torch.tensor([1 / 7 - 2 / 9, -7 / 9, 1.0])
    assert torch.allclose(aligned_giou(a, b), expected, atol=1e-6)
    assert torch.allclose(giou_loss(a, b), 1 - expected, atol=1e-6)
    assert torch.allclose(aligned_iou(a, b), torch.tensor([1 / 7, 0.0, 1.0]), atol=1e-6)


def test_giou_grad():
    # pred (0, 0, a, 2), target (1, 1, 3, 3), a = 2: giou = (a-1)/(a+5) - 1 + (a+5)/9
    # d loss / da = -(6 / (a+5)^2 + 1/9)
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]], requires_grad=True)
    giou_loss(pred, torch.tensor([[1.0, 1.0, 3.0, 3.0]])).sum().backward()
    assert pred.grad[0, 2].item() == pytest.approx(-(6 / 49 + 1 / 9), rel=1e-5)


def test_distance_roundtrip_and_clip():
    pts = torch.tensor([[10.0, 20.0], [5.0, 5.0]])
    boxes = torch.tensor([[4.0, 12.0, 30.0, 21.0], [0.0, 1.0, 9.0, 6.0]])
    d = bbox2distance(pts, boxes)
    assert torch.allclose(distance2bbox(pts, d), boxes)
    # clamp to reg_max - 0.1
    assert bbox2distance(pts, boxes, max_dis=4).max().item() == pytest.approx(3.9)
    clipped = distance2bbox(pts, torch.tensor([[20.0, 30, 50, 1], [1, 1, 1, 1]]), torch.tensor([32.0, 40.0]))
    assert clipped[0].tolist() == [0.0, 0.0, 40.0, 21.0]
