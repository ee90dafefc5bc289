"""gfl_det.fast: each speed switch computes what the readable code computes.

- fast.qfl.fused_qfl_sum: the criterion's QFL sum and its gradient, against the readable
  ``quality_focal_loss`` over the dense (B, A, C) target (float64, several chunks per level);
- fast.pool.SeparableStemMaxPool: F.max_pool2d bit for bit, used only where no gradient flows.
- fast.fold_bn: the backbone's fixed-statistics BNs folded into their convs in training, the
  same outputs and gradients (float64: to 1e-12), less kept for backward, and a frozen pair's
  fold reused until its weights change.
(fast.winograd: tests/test_winograd.py; fast.malloc: tests/test_malloc.py; fast.fuse:
tests/test_models.py; the criterion with fused_qfl on the golden files: test_mmdet_parity.py.)
"""
import pytest
import torch
from conftest import ROOT, kept_for_backward

import gfl_det.fast.pool as fpool
import gfl_det.fast.qfl as fqfl
from gfl_det.fast.pool import SeparableStemMaxPool, stem_max_pool, use_separable_stem_pool
from gfl_det.losses import quality_focal_loss
from gfl_det.models import ResNet
from gfl_det.postprocess import flatten_cls

LEVEL_HW = [(12, 10), (6, 5), (3, 3), (2, 2)]  # 120 + 30 + 9 + 4 = 163 priors


def _qfl_case(dtype, seed=0):
    """Per-level logits (B, C, H, W), a valid mask, and dense per-prior labels (C = background)
    and IoU targets with positives on every level, as the criterion has them."""
    g = torch.Generator().manual_seed(seed)
    B, C = 2, 7
    levels = [(torch.randn(B, C, h, w, generator=g) * 6).to(dtype).requires_grad_() for h, w in LEVEL_HW]
    A = sum(h * w for h, w in LEVEL_HW)
    valid = torch.rand(B, A, generator=g) > 0.2
    starts = torch.tensor([0, 120, 150, 159])
    flat = torch.cat([torch.randperm(B * A, generator=g)[:50], starts + A, starts + 5]).unique()  # every level
    labels = torch.full((B * A,), C)
    labels[flat] = torch.randint(0, C, (len(flat),), generator=g)
    quality = torch.zeros(B * A, dtype=dtype)
    quality[flat] = torch.rand(len(flat), generator=g).to(dtype)
    valid.view(-1)[flat] = True  # positives are valid priors
    labels, quality = labels.view(B, A), quality.view(B, A)
    dense = torch.nn.functional.one_hot(labels, C + 1)[..., :C].to(dtype) * quality[..., None]  # (B, A, C)
    return levels, valid, labels, quality, dense


def _readable(levels, valid, dense, beta=2.0):
    return (quality_focal_loss(flatten_cls(levels), dense, beta).sum(-1) * valid).sum()


def test_fused_qfl_sum_matches_readable_qfl(monkeypatch):
    levels, valid, labels, quality, dense = _qfl_case(torch.float64)
    monkeypatch.setattr(fqfl, 'CHUNK', 100)  # several column chunks per level, partial ones
    fused = fqfl.fused_qfl_sum(levels, valid, labels, quality)
    gf = torch.autograd.grad(fused * 3.0, levels)
    ref = _readable(levels, valid, dense)
    gr = torch.autograd.grad(ref * 3.0, levels)
    assert torch.allclose(fused, ref, rtol=1e-12)
    # (autograd takes d softplus = 1 above its threshold 20, sigmoid(20) = 1 - 2e-9: hence rtol 1e-7)
    for a, b in zip(gf, gr):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-7, atol=1e-12)


def test_fused_qfl_sum_gradcheck():
    levels, valid, labels, quality, _ = _qfl_case(torch.float64, seed=2)
    small = [x.detach()[:, :, :2, :2].contiguous().requires_grad_() for x in levels[2:]]  # 4 + 4 priors
    sub_valid = torch.tensor([[True] * 8, [True, False] * 4])
    sub_labels = torch.tensor([[7, 2, 7, 7, 7, 7, 7, 7], [0, 7, 7, 7, 7, 7, 5, 7]])
    sub_q = torch.tensor([[0.0, 0.3, 0, 0, 0, 0, 0, 0], [0.9, 0, 0, 0, 0, 0, 0.5, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: fqfl.fused_qfl_sum([a, b], sub_valid, sub_labels, sub_q),
                                    tuple(small))


def test_fused_qfl_sum_float32_close_to_float64():
    """The dense pass's log(sigmoid) softplus keeps float32 as close to the exact value as autograd's ops."""
    levels, valid, labels, quality, dense = _qfl_case(torch.float32, seed=1)
    l64 = [x.detach().double().requires_grad_() for x in levels]
    exact = _readable(l64, valid, dense.double())
    g64 = torch.autograd.grad(exact, l64)
    fused = fqfl.fused_qfl_sum(levels, valid, labels, quality)
    g32 = torch.autograd.grad(fused, levels)
    assert abs(fused.item() - exact.item()) <= 1e-6 * exact.item()
    for a, b in zip(g32, g64):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-7)


def test_fused_qfl_sum_bf16_levels_get_bf16_gradients():
    levels, valid, labels, quality, dense = _qfl_case(torch.float32, seed=3)
    lb = [x.detach().bfloat16().requires_grad_() for x in levels]
    fused = fqfl.fused_qfl_sum(lb, valid, labels, quality)  # computed in float32
    ref = _readable([x.detach().float() for x in lb], valid, dense)
    assert fused.dtype == torch.float32 and abs(fused.item() - ref.item()) <= 1e-5 * ref.item()
    grads = torch.autograd.grad(fused, lb)
    assert all(g.dtype == torch.bfloat16 and g.shape == x.shape for g, x in zip(grads, lb))


@pytest.mark.parametrize("hw", [(400, 608), (401, 607), (7, 9), (1, 1), (2, 3), (3, 2)])
def test_stem_max_pool_equals_max_pool2d_bit_for_bit(hw):
    g = torch.Generator().manual_seed(hw[0] * 1000 + hw[1])
    x = torch.randn(2, 5, *hw, generator=g)
    x[0, 0, 0, 0] = float("nan")  # NaN propagates into every window that holds it
    x[1, 1].fill_(float("-inf"))  # all -inf windows stay -inf (the padding is -inf too)
    x[1, 2, :, 0] = 1e30
    got, ref = stem_max_pool(x), torch.nn.functional.max_pool2d(x, 3, 2, 1)
    assert got.shape == ref.shape and got.is_contiguous()
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.nan_to_num(0.5), ref.nan_to_num(0.5))


def test_separable_stem_pool_only_where_no_gradient_flows(monkeypatch):
    """The separable pool runs in inference and behind a frozen stem; a trainable stem keeps
    MaxPool2d's kernel, whose gradient takes one maximum per window. Outputs and gradients equal
    a model with the plain pool."""
    calls = []
    real = fpool.stem_max_pool
    monkeypatch.setattr(fpool, "stem_max_pool", lambda x: calls.append(1) or real(x))
    torch.manual_seed(0)
    fast = ResNet(depth=18, base_channels=8, frozen_stages=-1, norm_eval=True)
    assert use_separable_stem_pool(fast) and isinstance(fast.maxpool, SeparableStemMaxPool)
    plain = ResNet(depth=18, base_channels=8, frozen_stages=-1, norm_eval=True)
    plain.load_state_dict(fast.state_dict())
    assert type(plain.maxpool) is torch.nn.MaxPool2d
    x = torch.randn(2, 3, 67, 93)
    with torch.no_grad():
        for a, b in zip(fast(x), plain(x)):
            assert torch.equal(a, b)
    assert len(calls) == 1  # inference: the separable passes
    fast.train(), plain.train()
    sum(o.sum() for o in fast(x)).backward()
    sum(o.sum() for o in plain(x)).backward()
    assert len(calls) == 1  # a trainable stem: MaxPool2d
    assert fast.conv1.weight.grad is not None
    assert torch.equal(fast.conv1.weight.grad, plain.conv1.weight.grad)
    frozen = ResNet(depth=18, base_channels=8, frozen_stages=1).train()
    use_separable_stem_pool(frozen)
    sum(o.sum() for o in frozen(x)).backward()
    assert len(calls) == 2  # frozen stem in training: no gradient reaches the pool, separable


def test_use_separable_stem_pool_leaves_other_pools():
    r = ResNet(depth=18, base_channels=8)
    r.maxpool = torch.nn.MaxPool2d(2, 2)
    assert not use_separable_stem_pool(r) and type(r.maxpool) is torch.nn.MaxPool2d


def test_build_detector_fast_switches():
    from gfl_det.models import build_detector
    cfg = dict(backbone=dict(depth=18, base_channels=8, init_cfg=None), neck=dict(in_channels=[8, 16, 32, 64],
               out_channels=32), bbox_head=dict(num_classes=3, in_channels=32, feat_channels=32, stacked_convs=1))
    m = build_detector(cfg)
    assert isinstance(m.backbone.maxpool, SeparableStemMaxPool) and not m.criterion.fused_qfl
    assert not any(getattr(b, 'fold_into_conv', False) for b in m.backbone.modules())
    m = build_detector(dict(cfg, fast=dict(stem_pool=False, fused_qfl=True, fold_bn=True)))
    assert type(m.backbone.maxpool) is torch.nn.MaxPool2d and m.criterion.fused_qfl
    assert m.backbone.bn1.fold_into_conv and m.backbone.layer4[1].bn2.fold_into_conv
    with pytest.raises(ValueError, match="model.fast.winograd"):
        build_detector(dict(cfg, fast=dict(winograd=True)))
    with pytest.raises(ValueError, match="fused_qfl implements QFL with beta 2 only"):
        build_detector(dict(cfg, fast=dict(fused_qfl=True),
                            bbox_head=dict(cfg['bbox_head'], loss_cls=dict(type='QualityFocalLoss', beta=1.5))))


def _resnet_with_statistics(depth=50, **kw):
    """A small ResNet whose BNs have non-trivial statistics and affine parameters (as pretrained
    ones), frozen stem + stage 1, norm_eval, in train mode."""
    torch.manual_seed(0)
    r = ResNet(depth=depth, base_channels=8, frozen_stages=1, norm_eval=True, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in r.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
    return r.train()


@pytest.mark.parametrize('depth', [18, 50])
def test_fold_bn_equals_conv_then_bn_with_every_gradient(depth):
    from gfl_det.fast.fold_bn import use_folded_bn
    plain = _resnet_with_statistics(depth).double()
    folded = use_folded_bn(_resnet_with_statistics(depth).double())
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    outs_p, outs_f = plain(x), folded(x)
    w = [torch.randn_like(o) for o in outs_p]
    sum((o * wi).sum() for o, wi in zip(outs_p, w)).backward()
    sum((o * wi).sum() for o, wi in zip(outs_f, w)).backward()
    for a, b in zip(outs_p, outs_f):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert any(n.endswith('bn1.weight') for n in grads) and 'layer1.0.conv1.weight' not in grads  # frozen
    for n, p in folded.named_parameters():
        assert (p.grad is None) == (n not in grads), n
        if p.grad is not None:
            assert torch.allclose(p.grad, grads[n], rtol=1e-10, atol=1e-12), n
    assert plain.state_dict().keys() == folded.state_dict().keys()  # mmdet's keys stay


def test_fold_bn_keeps_less_for_backward_and_leaves_training_bns_alone():
    from gfl_det.fast.fold_bn import use_folded_bn
    x = torch.randn(2, 3, 256, 384)  # large enough for the activations to outweigh the weights
    _, plain = kept_for_backward(_resnet_with_statistics(), x)
    _, folded = kept_for_backward(use_folded_bn(_resnet_with_statistics()), x)
    assert folded < 0.85 * plain, (folded, plain)  # the BNs' copies of the conv outputs are gone
    # a BN that trains its statistics (norm_eval=False) is not folded: batch statistics move
    torch.manual_seed(0)
    r = use_folded_bn(ResNet(depth=50, base_channels=8, frozen_stages=-1, norm_eval=False).train())
    before = r.layer2[0].bn1.running_mean.clone()
    r(x)
    assert not torch.equal(before, r.layer2[0].bn1.running_mean)


def test_fold_bn_reuses_a_frozen_pair_until_its_weights_change():
    from gfl_det.fast.fold_bn import use_folded_bn
    r = use_folded_bn(_resnet_with_statistics().double())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    r(x)
    first = r.bn1.__dict__['_folded']  # the stem: frozen, folded once
    r(x)
    assert r.bn1.__dict__['_folded'] is first
    assert '_folded' not in r.layer2[0].bn1.__dict__  # trainable: folded in the graph each time
    plain = _resnet_with_statistics().double()
    sd = plain.state_dict()
    sd['bn1.running_var'] = sd['bn1.running_var'] * 2  # e.g. a checkpoint loaded
    plain.load_state_dict(sd)
    r.load_state_dict(sd)
    with torch.no_grad():
        for a, b in zip(r(x), plain(x)):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    assert r.bn1.__dict__['_folded'] is not first


# ---------------------------------------------------------------- fast.compile_loss
def _small_detector(**fast):
    from gfl_det.models import build_detector
    cfg = dict(backbone=dict(depth=18, base_channels=8, init_cfg=None), neck=dict(in_channels=[8, 16, 32, 64],
               out_channels=32), bbox_head=dict(num_classes=3, in_channels=32, feat_channels=32, stacked_convs=1),
               fast=fast)
    torch.manual_seed(0)
    return build_detector(cfg)


def _loss_case(model, H, W, G, seed):
    """Head outputs (leaves, so their gradients can be compared), gt and metas of a batch of 2
    whose second image is narrower than the batch (its own pad shape)."""
    from gfl_det.structures import HeadOutputs, Targets
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = model(torch.randn(2, 3, H, W, generator=g))
    out = HeadOutputs([c.clone().requires_grad_() for c in out.cls], [r.clone().requires_grad_() for r in out.reg])
    xy = torch.rand(2, G, 2, generator=g) * torch.tensor([W - 64.0, H - 64.0])
    wh = 8 + torch.rand(2, G, 2, generator=g) * 56
    valid = torch.rand(2, G, generator=g) > 0.2
    targets = Targets(torch.cat([xy, xy + wh], -1), torch.randint(0, 3, (2, G), generator=g).masked_fill(~valid, -1),
                      valid)
    metas = [dict(img_shape=(H, W), pad_shape=(H, W)), dict(img_shape=(H, W - 32), pad_shape=(H, W - 32))]
    return out, targets, metas


def _losses_and_grads(criterion, out, targets, metas):
    losses = criterion(out, targets, metas)
    grads = torch.autograd.grad(sum(losses.values()), out.cls + out.reg)
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize('fused_qfl', [False, True])
def test_compile_loss_compiles_once_for_every_image_shape(fused_qfl):
    """model.fast.compile_loss: one dynamo graph serves batches of other padded shapes and gt
    counts (no recompilation per shape: dynamo would give up after 8 and run eager), with the
    values and gradients of the eager criterion (with fused_qfl too: compiled, the readable QFL
    is traced instead of its shape-sized chunk loop, equal to float rounding). The eager backend checks the capture and its guards without code generation;
    the inductor test below checks the generated code."""
    from torch._dynamo.testing import CompileCounterWithBackend
    model = _small_detector(compile_loss=True, fused_qfl=fused_qfl)
    assert model.criterion.compile_loss
    counter = CompileCounterWithBackend('eager')
    model.criterion.compile_backend = counter
    torch._dynamo.reset()
    try:
        # square and not, C = 3 equal to nothing in particular, a level's W equal to another's H
        for i, (H, W, G) in enumerate([(256, 320, 10), (320, 384, 10), (384, 384, 7), (256, 448, 12), (512, 320, 3)]):
            out, targets, metas = _loss_case(model, H, W, G, seed=i)
            got, got_g = _losses_and_grads(model.criterion, out, targets, metas)
            model.criterion.compile_loss = False
            want, want_g = _losses_and_grads(model.criterion, out, targets, metas)
            model.criterion.compile_loss = True
            for k in want:
                if fused_qfl:
                    torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=0, msg=k)
                else:
                    assert torch.equal(got[k], want[k]), (H, W, G, k)
            for a, b in zip(got_g, want_g):
                if fused_qfl:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
                else:
                    assert torch.equal(a, b), (H, W, G)
            assert counter.frame_count == 1, f'recompiled for {H}x{W}, {G} gt'
    finally:
        torch._dynamo.reset()


def test_compile_loss_with_the_embedding_term_and_inductor():
    """Inductor's generated code gives the eager losses and head gradients (float32 rounding),
    for a second image shape too; the extra embedding term runs eagerly on the compiled part's
    prior targets and positives."""
    from mmengine.config import Config

    from gfl_det.models import build_detector
    from gfl_det.structures import Targets
    cfg = Config.fromfile(str(ROOT / 'configs' / 'gfl_r18_synthetic_reid.py')).model.to_dict()
    cfg['backbone'].pop('init_cfg', None)
    cfg['fast'] = dict(cfg.get('fast') or {}, compile_loss=True)
    torch.manual_seed(0)
    model = build_detector(cfg)
    assert 'embed' in dict(model.criterion.terms())
    torch._dynamo.reset()
    try:
        for i, (H, W) in enumerate([(320, 384), (384, 448)]):
            g = torch.Generator().manual_seed(i)
            G = 6
            xy = torch.rand(2, G, 2, generator=g) * torch.tensor([W - 96.0, H - 96.0])
            targets = Targets(torch.cat([xy, xy + 32 + 64 * torch.rand(2, G, 2, generator=g)], -1),
                              torch.randint(0, model.num_classes, (2, G), generator=g),
                              torch.ones(2, G, dtype=torch.bool), torch.arange(2 * G).view(2, G) % 5)
            metas = [dict(img_shape=(H, W), pad_shape=(H, W))] * 2
            images = torch.randn(2, 3, H, W, generator=g)
            got = model.criterion(model(images), targets, metas)
            got_g = torch.autograd.grad(sum(got.values()), list(model.bbox_head.parameters()), allow_unused=True)
            model.criterion.compile_loss = False
            want = model.criterion(model(images), targets, metas)  # a new forward: a compiled backward frees its own
            want_g = torch.autograd.grad(sum(want.values()), list(model.bbox_head.parameters()), allow_unused=True)
            model.criterion.compile_loss = True
            assert set(got) == set(want) and 'loss_embed' in got
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
            for a, b in zip(got_g, want_g):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()
