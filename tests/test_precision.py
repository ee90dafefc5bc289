"""Mixed precision and channels-last are options that must not change results beyond their
noise: the losses are float32 whatever autocast does, bf16 training stays close to fp32, and
channels-last is the same arithmetic in another memory layout."""
from __future__ import annotations

import pytest
import torch

from gfl_det.models import build_detector
from gfl_det.structures import HeadOutputs, Targets

from test_smoke import make_image, small_cfg

METAS = [dict(img_shape=(160, 160), pad_shape=(160, 160), ori_shape=(160, 160),
              scale_factor=(1.0, 1.0))]


def setup(seed=0):
    torch.manual_seed(seed)
    model = build_detector(small_cfg()).train()
    img, boxes, labels = make_image()
    x = model.preprocess(img, METAS)
    return model, x, Targets(boxes[None], labels[None], torch.ones(1, 3, dtype=torch.bool))


def losses_and_grads(model, x, gt):
    model.zero_grad()
    losses = model.loss(x, gt, METAS)
    sum(losses.values()).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {k: v.detach() for k, v in losses.items()}, grads


def test_loss_is_float32_under_autocast_from_bf16_head_outputs():
    """Head outputs in bf16 (what autocast gives): the loss equals, bit for bit, the float32 loss
    of the same bf16 values outside autocast -- nothing in assignment, QFL, DFL or GIoU runs in
    reduced precision -- and is float32."""
    model, x, gt = setup()
    with torch.no_grad():
        out = model(x)
    cls16 = [c.bfloat16().requires_grad_() for c in out.cls]
    reg16 = [r.bfloat16().requires_grad_() for r in out.reg]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        amp = model.criterion(HeadOutputs(cls16, reg16), gt, METAS)
    ref = model.criterion(HeadOutputs([c.float() for c in cls16], [r.float() for r in reg16]), gt, METAS)
    for k in ref:
        assert amp[k].dtype == torch.float32, k
        assert torch.equal(amp[k], ref[k]), (k, amp[k], ref[k])
    sum(amp.values()).backward()   # gradients flow back to the bf16 outputs, in bf16
    assert cls16[0].grad.dtype == torch.bfloat16 and torch.isfinite(cls16[0].grad).all()


def test_bf16_autocast_training_step_is_within_mixed_precision_noise_of_fp32():
    model, x, gt = setup()
    ref, g_ref = losses_and_grads(model, x, gt)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        amp, g_amp = losses_and_grads(model, x, gt)
    for k in ref:
        assert amp[k].dtype == torch.float32
        rel = abs(amp[k] - ref[k]) / ref[k]
        assert 0 < rel < 0.01, (k, float(amp[k]), float(ref[k]))   # bf16: ~3 digits (1e-3 seen)
    cos = torch.nn.functional.cosine_similarity(g_amp, g_ref, dim=0)
    assert cos > 0.99, float(cos)


def test_channels_last_gives_the_same_losses_gradients_and_detections():
    model, x, gt = setup()
    ref, g_ref = losses_and_grads(model, x, gt)
    model.eval()
    with torch.no_grad():
        det_ref = model.predict(x, METAS)[0]
    model.train()
    model.channels_last = True
    img, _, _ = make_image()
    xcl = model.preprocess(img, METAS)
    assert xcl.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
        memory_format=torch.channels_last)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    cl, g_cl = losses_and_grads(model, xcl, gt)
    for k in ref:
        torch.testing.assert_close(cl[k], ref[k], rtol=1e-5, atol=0)
    torch.testing.assert_close(g_cl, g_ref, rtol=1e-4, atol=1e-6)
    model.eval()
    with torch.no_grad():
        det = model.predict(xcl, METAS)[0]
    n = min(len(det['scores']), 20)   # the top detections: same boxes, scores and labels
    torch.testing.assert_close(det['scores'][:n], det_ref['scores'][:n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(det['bboxes'][:n], det_ref['bboxes'][:n], rtol=0, atol=1e-3)
    assert torch.equal(det['labels'][:n], det_ref['labels'][:n])


def test_channels_last_survives_load_state_dict_and_switches_back(tmp_path):
    model, x, gt = setup()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.channels_last = True
    model.load_state_dict(sd)
    w = model.bbox_head.gfl_cls.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and torch.equal(w, sd['bbox_head.gfl_cls.weight'])
    model.channels_last = False
    assert model.bbox_head.gfl_cls.weight.is_contiguous()
    cfg = small_cfg()
    cfg['channels_last'] = True                       # the config key (model.channels_last)
    assert build_detector(cfg).neck.fpn_convs[0].conv.weight.is_contiguous(
        memory_format=torch.channels_last)
