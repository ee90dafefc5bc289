"""QFL, DFL and GIoU against values worked out by hand (including gradients)."""
import math

import pytest
import torch

from gfl_det.boxes import aligned_giou, aligned_iou, bbox2distance, distance2bbox, pairwise_iou
from gfl_det.losses import distribution_focal_loss, giou_loss, qfl_negative, quality_focal_loss

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


def test_qfl_negative_equals_qfl_with_zero_target():
    x = torch.linspace(-30, 30, 61)
    assert torch.allclose(qfl_negative(x), quality_focal_loss(x, torch.zeros_like(x)), rtol=1e-5, atol=1e-6)
    assert qfl_negative(torch.tensor([0.0])).item() == pytest.approx(0.25 * LN2, rel=1e-6)


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


def test_pairwise_iou_matches_aligned():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(7, 4, generator=g) * 50
    a[:, 2:] += a[:, :2]
    b = torch.rand(5, 4, generator=g) * 50
    b[:, 2:] += b[:, :2]
    full = pairwise_iou(a, b)
    for i in range(7):
        assert torch.allclose(full[i], aligned_iou(a[i].expand(5, 4), b), atol=1e-7)


def test_distance_roundtrip_and_clip():
    pts = torch.tensor([[10.0, 20.0], [5.0, 5.0]])
    boxes = torch.tensor([[4.0, 12.0, 30.0, 21.0], [0.0, 1.0, 9.0, 6.0]])
    d = bbox2distance(pts, boxes)
    assert torch.allclose(distance2bbox(pts, d), boxes)
    # clamp to reg_max - 0.1
    assert bbox2distance(pts, boxes, max_dis=4).max().item() == pytest.approx(3.9)
    clipped = distance2bbox(pts, torch.tensor([[20.0, 30, 50, 1], [1, 1, 1, 1]]), torch.tensor([32.0, 40.0]))
    assert clipped[0].tolist() == [0.0, 0.0, 40.0, 21.0]


LEVEL_HW = [(12, 10), (6, 5), (3, 3), (2, 2)]  # 120 + 30 + 9 + 4 = 163 priors


def _qfl_case(dtype, seed=0):
    """Per-level dense logits (B, C, H, W), a valid mask over all priors, positives at (image,
    prior, class) with IoU targets -- on every level -- plus slots that are not positives
    (weight 0, some at the same prior as a positive), as the loss has."""
    g = torch.Generator().manual_seed(seed)
    B, C = 2, 7
    levels = [(torch.randn(B, C, h, w, generator=g) * 6).to(dtype).requires_grad_() for h, w in LEVEL_HW]
    A = sum(h * w for h, w in LEVEL_HW)
    valid = torch.rand(B, A, generator=g) > 0.2
    starts = torch.tensor([0, 120, 150, 159])
    flat = torch.cat([torch.randperm(B * A, generator=g)[:50], starts + A, starts + 5]).unique()  # every level
    valid.view(-1)[flat] = True  # positives are valid priors
    n = len(flat)
    img, prior = flat // A, flat % A
    label = torch.randint(0, C, (n,), generator=g)
    q = torch.rand(n, generator=g).to(dtype)
    dense_t = torch.zeros(B * A, C, dtype=dtype)
    dense_t[flat, label] = q
    # slots: every positive once (weight 1) + the same priors again at other classes (weight 0)
    slots = (torch.cat([img, img]), torch.cat([prior, prior]), torch.cat([label, (label + 1) % C]))
    tgt = torch.cat([q, torch.rand(n, generator=g).to(dtype)])
    wt = torch.cat([torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype)])
    return levels, valid, slots, tgt, wt, dense_t.view(B, A, C)


@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_fused_qfl_sum_matches_dense_autograd(beta):
    from gfl_det.losses import _QFLSum, qfl_sum
    from gfl_det.postprocess import flatten_cls
    levels, valid, slots, tgt, wt, dense_t = _qfl_case(torch.float64)
    old = _QFLSum.CHUNK
    _QFLSum.CHUNK = 100  # several column chunks per level, partial ones
    try:
        fused, prior_max = qfl_sum(levels, valid, *slots, tgt, wt, beta)
        gf = torch.autograd.grad(fused * 3.0, levels)
    finally:
        _QFLSum.CHUNK = old
    ref = (quality_focal_loss(flatten_cls(levels), dense_t, beta).sum(-1) * valid).sum()
    gr = torch.autograd.grad(ref * 3.0, levels)
    assert torch.allclose(fused, ref, rtol=1e-12)
    assert torch.equal(prior_max, flatten_cls(levels).detach().amax(-1)) and not prior_max.requires_grad
    # (autograd takes d softplus = 1 above its threshold 20, sigmoid(20) = 1 - 2e-9: hence rtol 1e-7)
    for a, b in zip(gf, gr):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-7, atol=1e-12)
    if beta == 2.0:
        small = [x.detach()[:, :, :2, :2].contiguous().requires_grad_() for x in levels[2:]]  # 4 + 4 priors
        sub_valid = torch.tensor([[True] * 8, [True, False] * 4])
        sub_slots = (torch.tensor([0, 1, 1]), torch.tensor([1, 3, 6]), torch.tensor([2, 0, 5]))
        assert torch.autograd.gradcheck(
            lambda a, b: qfl_sum([a, b], sub_valid, *sub_slots, torch.tensor([0.3, 0.9, 0.5], dtype=torch.float64),
                                 torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))[0], tuple(small))


def test_fused_qfl_sum_float32_close_to_float64():
    """The dense pass's log(1 + e) shortcut keeps float32 as close to the exact value as autograd's ops."""
    from gfl_det.losses import qfl_sum
    from gfl_det.postprocess import flatten_cls
    levels, valid, slots, tgt, wt, dense_t = _qfl_case(torch.float32, seed=1)
    l64 = [x.detach().double().requires_grad_() for x in levels]
    exact = (quality_focal_loss(flatten_cls(l64), dense_t.double()).sum(-1) * valid).sum()
    g64 = torch.autograd.grad(exact, l64)
    fused = qfl_sum(levels, valid, *slots, tgt, wt)[0]
    g32 = torch.autograd.grad(fused, levels)
    assert abs(fused.item() - exact.item()) <= 1e-6 * exact.item()
    for a, b in zip(g32, g64):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-7)
