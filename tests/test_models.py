"""Backbone, neck, head and detector building: names, freezing, pretrained loading, shapes."""
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import kept_for_backward

from gfl_det.models import FPN, GFLHead, ResNet, build_detector

KEYS = Path(__file__).resolve().parents[2] / "shared" / "golden" / "gfl_r50_state_dict_keys.txt"


def r50_cfg(**head):
    return dict(type="GFL", backbone=dict(type="ResNet", depth=50),
                neck=dict(type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=256, start_level=1,
                          add_extra_convs="on_output", num_outs=5),
                bbox_head=dict(type="GFLHead", num_classes=80, in_channels=256, **head))


def test_r50_state_dict_keys_and_shapes_equal_mmdet():
    if not KEYS.is_file():
        pytest.skip(f"{KEYS} not found")
    rows = [ln.split("\t") for ln in KEYS.read_text().splitlines() if ln and not ln.startswith("#")]
    sd = build_detector(r50_cfg()).state_dict()
    assert list(sd) == [r[0] for r in rows]
    for key, shape, dtype in rows:
        assert str(tuple(sd[key].shape)) == shape, key
        assert str(sd[key].dtype).replace("torch.", "") == dtype, key


@pytest.mark.parametrize("depth,c5", [(18, 512), (34, 512), (50, 2048), (101, 2048)])
def test_resnet_depths_and_strides(depth, c5):
    net = ResNet(depth).eval()
    outs = net(torch.zeros(1, 3, 64, 96))
    assert [o.shape[1] for o in outs][-1] == c5
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_frozen_stages_and_norm_eval():
    net = ResNet(18, base_channels=16, frozen_stages=1, norm_eval=True)
    net.train()
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1.")) for n in frozen)
    assert all(p.requires_grad for n, p in net.named_parameters() if n.startswith(("layer2", "layer3", "layer4")))
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for m in bns)
    before = bns[-1].running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, bns[-1].running_mean)  # running stats untouched in train()
    # norm_eval=False: BN trains, frozen stem stays in eval
    net2 = ResNet(18, base_channels=16, frozen_stages=1, norm_eval=False).train()
    assert net2.layer2[0].bn1.training and not net2.bn1.training and not net2.layer1[0].bn1.training


@pytest.mark.parametrize('depth', [18, 50])
def test_with_cp_recomputes_blocks_same_gradients_less_kept(depth):
    """backbone with_cp (MMDetection's key): each residual block whose input needs a gradient is
    recomputed in backward -- the same outputs and gradients bit for bit, less kept for backward
    (R50 GFL, 2 x 512x768: 1,172 -> 716 MB, the step 15 % slower on this CPU)."""
    def run(with_cp):
        torch.manual_seed(0)
        r = ResNet(depth=depth, base_channels=8, frozen_stages=0, norm_eval=True, with_cp=with_cp).train()
        x = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(1))
        outs, kept = kept_for_backward(r, x)
        sum((o * o).sum() for o in outs).backward()
        return outs, {n: p.grad for n, p in r.named_parameters() if p.grad is not None}, kept
    outs, grads, kept = run(False)
    outs_cp, grads_cp, kept_cp = run(True)
    assert all(torch.equal(a, b) for a, b in zip(outs, outs_cp))
    assert grads.keys() == grads_cp.keys() and all(torch.equal(grads[k], grads_cp[k]) for k in grads)
    assert kept_cp < 0.6 * kept, (kept_cp, kept)
    with pytest.raises(ValueError, match='with_cp=True needs norm_eval=True'):
        ResNet(depth=depth, base_channels=8, norm_eval=False, with_cp=True)
    cfg = dict(backbone=dict(depth=depth, base_channels=8, init_cfg=None, with_cp=True),
               neck=dict(in_channels=[8 * 2 ** i * (4 if depth == 50 else 1) for i in range(4)], out_channels=32),
               bbox_head=dict(num_classes=2, in_channels=32, feat_channels=32, stacked_convs=1))
    assert build_detector(cfg).backbone.layer2[0].with_cp  # the config key reaches the blocks


def test_with_cp_and_fold_bn_together():
    """Both memory switches at once (the pair gpu_check measures at batch 16): float64 outputs
    and gradients as the readable backbone's (fold_bn changes float32's order of operations),
    and less kept for backward than with_cp alone (R50 GFL, 2 x 512x768: 716 -> 639 MB)."""
    from gfl_det.fast.fold_bn import use_folded_bn

    def run(with_cp, fold):
        torch.manual_seed(0)
        r = ResNet(depth=50, base_channels=8, frozen_stages=0, norm_eval=True, with_cp=with_cp).double().train()
        with torch.no_grad():
            for m in r.modules():
                if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial fixed statistics
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        if fold:
            use_folded_bn(r)
        x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        outs, kept = kept_for_backward(r, x)
        sum((o * o).sum() for o in outs).backward()
        return outs, {n: p.grad for n, p in r.named_parameters() if p.grad is not None}, kept
    outs, grads, _ = run(False, False)
    _, _, kept_cp = run(True, False)
    outs_both, grads_both, kept_both = run(True, True)
    for a, b in zip(outs, outs_both):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grads.keys() == grads_both.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_both[k], rtol=1e-9, atol=1e-12, msg=k)
    assert kept_both < 0.95 * kept_cp, (kept_both, kept_cp)


def test_pretrained_from_torchvision_state_dict_file(tmp_path):
    tv = torchvision.models.resnet18()
    with torch.no_grad():
        tv.layer3[1].conv2.weight.normal_()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(tv.state_dict(), path)
    net = ResNet(18, pretrained=str(path))
    assert torch.equal(net.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    assert torch.equal(net.bn1.running_var, tv.bn1.running_var)
    # the same through a detector config, and an mmcls-style 'backbone.' prefixed checkpoint
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in tv.state_dict().items()}}, tmp_path / "cls.pth")
    cfg = dict(type="GFL", backbone=dict(type="ResNet", depth=18,
                                         init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "cls.pth"))),
               neck=dict(type="FPN", in_channels=[64, 128, 256, 512], out_channels=64),
               bbox_head=dict(type="GFLHead", num_classes=3, in_channels=64, feat_channels=64, stacked_convs=1))
    det = build_detector(cfg)
    assert torch.equal(det.backbone.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)


def test_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ResNet(18, pretrained=str(tmp_path / "missing.pth"))
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="do not fit ResNet-18"):
        ResNet(18, pretrained=str(tmp_path / "r34.pth"))
    # untrusted pickles are refused (weights_only=True)
    torch.save({"state_dict": torchvision.models.resnet18().state_dict(), "obj": Path("x")}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ResNet(18, pretrained=str(tmp_path / "evil.pth"))


def test_fpn_shapes_and_p6_from_p5_output():
    fpn = FPN([16, 32, 64, 128], 8, start_level=1, num_outs=5)
    feats = [torch.randn(1, c, s, s) for c, s in zip([16, 32, 64, 128], [40, 20, 10, 5])]
    outs = fpn(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2)]
    # P6 is computed from the P5 output, P7 from P6 (no ReLU in between)
    assert torch.allclose(outs[3], fpn.fpn_convs[3](outs[2]))
    assert torch.allclose(outs[4], fpn.fpn_convs[4](outs[3]))


def test_head_init_and_parameters():
    head = GFLHead(num_classes=7, in_channels=32, feat_channels=32, stacked_convs=3, reg_max=8)
    assert len(head.cls_convs) == 3 and head.gfl_reg.out_channels == 4 * 9
    assert torch.allclose(head.gfl_cls.bias, torch.full((7,), -4.59512), atol=1e-4)  # prior 0.01
    assert head.gfl_cls.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(head.integral.project, torch.arange(9.0))
    out = head([torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)])
    assert out.cls[0].shape == (2, 7, 8, 8) and out.reg[1].shape == (2, 36, 4, 4)
    assert out.level_shapes == [(8, 8), (4, 4)] and out.num_classes == 7 and out.reg_max == 8


def test_build_rejects_mismatched_channels():
    bad = r50_cfg()
    bad["neck"] = {**bad["neck"], "in_channels": [64, 128, 256, 512]}
    with pytest.raises(ValueError, match="in_channels"):
        build_detector(bad)


def test_predict_batch_and_empty():
    cfg = dict(type="GFL", backbone=dict(type="ResNet", depth=18, base_channels=16),
               neck=dict(type="FPN", in_channels=[16, 32, 64, 128], out_channels=32),
               bbox_head=dict(type="GFLHead", num_classes=4, in_channels=32, feat_channels=32, stacked_convs=1))
    model = build_detector(cfg).eval()
    metas = [dict(img_shape=(64, 96), ori_shape=(128, 192), scale_factor=(0.5, 0.5), pad_shape=(64, 96)),
             dict(img_shape=(50, 60), ori_shape=(50, 60), scale_factor=(1.0, 1.0), pad_shape=(64, 64))]
    x = model.preprocess(torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8), metas)
    assert x[1, :, 50:].abs().max() == 0 and x[1, :, :, 60:].abs().max() == 0
    # the prior bias gives scores ~0.01 < 0.05: no detection, and no crash
    preds = model.predict(x, metas)
    assert [len(p["bboxes"]) for p in preds] == [0, 0]
    with torch.no_grad():
        model.bbox_head.gfl_cls.bias.fill_(0.0)  # every score 0.5
    preds = model.predict(x, metas)
    assert all(0 < len(p["bboxes"]) < 100 for p in preds)  # NMS at 0.6 merges the many overlaps
    model.test_cfg["nms"] = dict(type="nms", iou_threshold=1.0)  # suppress nothing: the cap applies
    preds = model.predict(x, metas)
    for p, m in zip(preds, metas):
        assert len(p["bboxes"]) == 100
        assert (p["scores"][:-1] >= p["scores"][1:]).all()
        h, w = m["ori_shape"]
        assert p["bboxes"][:, 0::2].max() <= w + 1e-3 and p["bboxes"][:, 1::2].max() <= h + 1e-3


def test_fuse_for_inference_same_detections():
    from gfl_det.fast.fuse import fuse_for_inference
    torch.manual_seed(0)
    cfg = dict(type="GFL", backbone=dict(type="ResNet", depth=18, base_channels=16),
               neck=dict(type="FPN", in_channels=[16, 32, 64, 128], out_channels=64),
               bbox_head=dict(type="GFLHead", num_classes=4, in_channels=64, feat_channels=64, stacked_convs=1))
    model = build_detector(cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics and affine so folding is exercised
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        model.bbox_head.gfl_cls.bias.fill_(-1.0)
    x = torch.randn(1, 3, 96, 128)
    metas = [dict(img_shape=(96, 128), ori_shape=(96, 128), scale_factor=(1.0, 1.0))]
    with torch.no_grad():
        ref_maps = model(x)
        ref = model.predict(x, metas)[0]
    fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    with torch.no_grad():
        maps = model(x)
        out = model.predict(x, metas)[0]
    for a, b in zip(ref_maps.cls + ref_maps.reg, maps.cls + maps.reg):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert len(out["bboxes"]) == len(ref["bboxes"]) > 0
    assert torch.allclose(out["bboxes"], ref["bboxes"], atol=1e-2)


def test_compile_for_inference_same_detections_any_size():
    """torch.compile (inductor, freezing, dynamic shapes) of backbone + neck + head: predict uses
    it, detections equal eager ones, and a second image size runs without a new compilation
    (batch 1 both times and P7 larger than 1 x 1, as dynamo specialises dimensions of size 1;
    both sizes above a conv-size guard inductor adds near 200 x 200 px, as real images are)."""
    import copy
    from gfl_det.fast.fuse import compile_for_inference, fuse_for_inference
    torch.manual_seed(0)
    cfg = dict(type="GFL", backbone=dict(type="ResNet", depth=18, base_channels=16),
               neck=dict(type="FPN", in_channels=[16, 32, 64, 128], out_channels=64),
               bbox_head=dict(type="GFLHead", num_classes=3, in_channels=64, feat_channels=64, stacked_convs=1))
    model = build_detector(cfg).eval()
    with torch.no_grad():
        model.bbox_head.gfl_cls.bias.fill_(-1.0)
    cases = [(torch.randn(1, 3, 224, 256), [dict(img_shape=(224, 256), ori_shape=(224, 256), scale_factor=(1.0, 1.0))]),
             (torch.randn(1, 3, 256, 320), [dict(img_shape=(250, 320), ori_shape=(500, 640), scale_factor=(0.5, 0.5))])]
    ref = [model.predict(x, m) for x, m in cases]
    fused_keys = set(fuse_for_inference(copy.deepcopy(model)).state_dict())
    compile_for_inference(model)
    assert set(model.state_dict()) == fused_keys  # no copies of the weights under compiled_features
    torch._dynamo.utils.counters.clear()
    out = [model.predict(x, m) for x, m in cases]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for both sizes
    for rs, os_ in zip(ref, out):
        for r, o in zip(rs, os_):
            assert len(r["bboxes"]) == len(o["bboxes"]) > 0
            assert torch.equal(r["labels"], o["labels"])
            assert torch.allclose(r["bboxes"], o["bboxes"], atol=1e-2)
            assert torch.allclose(r["scores"], o["scores"], atol=1e-4)


@pytest.mark.parametrize('mode,want', [(None, {'freezing': True}),
                                       ('reduce-overhead', {'triton.cudagraphs': True, 'freezing': True})])
def test_compile_for_inference_mode_keeps_freezing(monkeypatch, mode, want):
    """torch.compile refuses a mode together with options: a mode becomes its options, and
    freezing stays on with it."""
    from gfl_det.fast import fuse
    seen = {}
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: seen.update(kw) or fn)
    model = build_detector(dict(backbone=dict(depth=18, base_channels=8, init_cfg=None),
                                neck=dict(in_channels=[8, 16, 32, 64], out_channels=32),
                                bbox_head=dict(num_classes=2, in_channels=32, feat_channels=32, stacked_convs=1))).eval()
    fuse.compile_for_inference(model, mode=mode)
    assert seen == {'dynamic': True, 'options': want}


def test_mmdet_model_zoo_checkpoint_loads_strictly_with_class_names(tmp_path):
    """A checkpoint laid out as MMDetection 3.x writes it (state_dict + meta.dataset_meta.classes,
    plus the non-tensor extras mmengine adds) loads with strict=True and weights_only=True."""
    from gfl_det.checkpoint import load_weights
    src = build_detector(r50_cfg())
    classes = tuple(f"class_{i}" for i in range(80))
    ckpt = {"meta": {"dataset_meta": {"classes": classes}, "mmdet_version": "3.3.0", "epoch": 12},
            "state_dict": src.state_dict()}
    path = tmp_path / "gfl_r50_fpn_1x_coco.pth"
    torch.save(ckpt, path)
    dst = build_detector(r50_cfg())
    meta = load_weights(dst, str(path), strict=True)
    assert meta["classes"] == classes and not meta["missing_keys"] and not meta["unexpected_keys"]
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_core_imports_without_mmengine():
    import subprocess
    import sys
    code = ("import sys; import gfl_det.models, gfl_det.assigner, gfl_det.postprocess, gfl_det.losses; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mmengine', 'mmcv', 'mmdet')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
