"""GFLCriterion beyond the golden files: normalisers across processes (DDP, gloo on the CPU),
images without boxes, extra loss terms, and the normalisers' formula written out."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gfl_det.criterion import EPS32, GFLCriterion
from gfl_det.models import build_detector
from gfl_det.structures import HeadOutputs, Targets

METAS = [dict(img_shape=(128, 160), pad_shape=(128, 160)), dict(img_shape=(96, 160), pad_shape=(96, 160))]


def small_model(seed=0):
    torch.manual_seed(seed)
    cfg = dict(backbone=dict(depth=18, base_channels=8, init_cfg=None),
               neck=dict(in_channels=[8, 16, 32, 64], out_channels=32),
               bbox_head=dict(num_classes=5, in_channels=32, feat_channels=32, stacked_convs=1))
    model = build_detector(cfg)
    with torch.no_grad():  # scores ~0.5: the box terms' weights sum well above 1 on each image
        model.bbox_head.gfl_cls.bias.zero_()
    return model


def case():
    """Two images with different box counts, their head outputs and targets."""
    model = small_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, 160, generator=g)
    with torch.no_grad():
        out = model(x)
    targets = Targets.from_lists([torch.tensor([[10., 12., 70., 90.], [80., 20., 150., 60.], [5., 5., 30., 40.]]),
                                  torch.tensor([[40., 30., 120., 90.]])],
                                 [torch.tensor([0, 3, 1]), torch.tensor([4])])
    return model.criterion, out, targets


def per_image(out: HeadOutputs, targets: Targets, i: int):
    keep = slice(i, i + 1)
    return (HeadOutputs([c[keep] for c in out.cls], [r[keep] for r in out.reg]),
            Targets(targets.boxes[keep], targets.labels[keep], targets.valid[keep]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, path: str, results, compile_loss: bool = False):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        crit, out, targets = torch.load(path, weights_only=False)
        crit.compile_loss, crit.compile_backend = compile_loss, 'eager'  # fast.compile_loss: the all-reduce traced
        o, t = per_image(out, targets, rank)
        losses = crit(o, t, METAS[rank:rank + 1])
        pt = crit.prior_targets(o, t, METAS[rank:rank + 1])
        norms = crit.normalisers(pt, crit.positives(o, pt))
        results[rank] = ({k: v.item() for k, v in losses.items()}, {k: v.item() for k, v in norms.items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('compile_loss', [False, True], ids=['eager', 'compile_loss'])
def test_ddp_ranks_use_the_global_normalisers(tmp_path, compile_loss):
    """Rank r computes the loss of image r alone; its normalisers are the mean over the ranks
    (MMDetection's reduce_mean), so the ranks' mean loss -- what DDP's averaged gradient
    descends -- equals the single-process loss of both images (mmdet's formula) to 1e-6; also
    with ``model.fast.compile_loss``, whose graph holds the all-reduce."""
    crit, out, targets = case()
    path = str(tmp_path / 'case.pt')
    torch.save((crit, out, targets), path)
    single = crit(out, targets, METAS)
    # mmdet's formula by hand from the per-image sums
    sums, norms = [], []
    for i in range(2):
        o, t = per_image(out, targets, i)
        pt = crit.prior_targets(o, t, METAS[i:i + 1])
        p = crit.positives(o, pt)
        sums.append(crit.loss_sums(o, pt, p))
        norms.append((pt.num_pos.clamp(min=1).sum().item(), p.weight.sum().item()))
    n_mean = (norms[0][0] + norms[1][0]) / 2
    w_mean = max((norms[0][1] + norms[1][1]) / 2, 1.0)
    assert w_mean > 1  # the clamp does not decide: the single-process and DDP losses are comparable

    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), path, results, compile_loss), nprocs=2, join=True)
    for r in range(2):
        losses, got = results[r]
        assert got['loss_cls'] == pytest.approx(n_mean + EPS32, rel=1e-6)
        assert got['loss_bbox'] == pytest.approx(w_mean, rel=1e-6)
        lw = crit.loss_weights
        assert losses['loss_cls'] == pytest.approx(lw['loss_cls'] * sums[r]['loss_cls'].item() / (n_mean + EPS32),
                                                   rel=1e-6)
        assert losses['loss_bbox'] == pytest.approx(lw['loss_bbox'] * sums[r]['loss_bbox'].item() / w_mean, rel=1e-6)
        assert losses['loss_dfl'] == pytest.approx(lw['loss_dfl'] * sums[r]['loss_dfl'].item() / w_mean, rel=1e-6)
    for k, v in single.items():
        mean = (results[0][0][k] + results[1][0][k]) / 2
        assert mean == pytest.approx(v.item(), rel=1e-6), k
    # and without the all-reduce (per-process normalisers) they would differ: the test can fail
    local = [crit(*per_image(out, targets, i), METAS[i:i + 1])['loss_cls'].item() for i in range(2)]
    assert abs(sum(local) / 2 - single['loss_cls'].item()) > 1e-3 * single['loss_cls'].item()


def test_normalisers_formula_and_image_without_boxes():
    crit, out, targets = case()
    targets.valid[1] = False  # image 1 has no box: counts 1 in N, adds no box weight
    pt = crit.prior_targets(out, targets, METAS)
    p = crit.positives(out, pt)
    n = crit.normalisers(pt, p)
    assert pt.num_pos[1] == 0 and pt.num_pos[0] > 0
    assert n['loss_cls'].item() == pytest.approx(pt.num_pos[0].item() + 1 + EPS32)
    assert n['loss_bbox'].item() == pytest.approx(max(p.weight.sum().item(), 1.0))
    assert (p.weight[1] == 0).all() and (p.quality[1] == 0).all()


def test_no_box_in_the_batch_gives_finite_losses_and_gradients():
    crit, out, _ = case()
    empty = Targets(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool))
    cls = [c.clone().requires_grad_() for c in out.cls]
    reg = [r.clone().requires_grad_() for r in out.reg]
    losses = crit(HeadOutputs(cls, reg), empty, METAS)
    assert losses['loss_bbox'].item() == 0 and losses['loss_dfl'].item() == 0 and losses['loss_cls'] > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(c.grad).all() for c in cls + reg)
    assert all((r.grad == 0).all() for r in reg)  # no positive: no box gradient


def test_extra_terms_plug_in_without_touching_the_others():
    crit, out, targets = case()
    base = crit(out, targets, METAS)

    class CountPositives(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(2.0))  # a learnable loss parameter

        def forward(self, outputs, targets, prior_targets, positives):
            return {'loss_extra': self.scale * prior_targets.pos.sum()}

    extra = GFLCriterion(5, extra_terms={'count': CountPositives()})
    losses = extra(out, targets, METAS)
    for k in base:
        assert torch.equal(losses[k], base[k])
    assert losses['loss_extra'].item() == 2.0 * crit.prior_targets(out, targets, METAS).pos.sum().item()
    assert [n for n, _ in extra.named_parameters()] == ['extra_terms.count.scale']
    clash = GFLCriterion(5, extra_terms={'bad': lambda *a: {'loss_cls': torch.zeros(())}})
    with pytest.raises(KeyError, match="'bad' returned 'loss_cls'"):
        clash(out, targets, METAS)
