"""The embedding branch: the tower's outputs, the choice of positives against a brute-force loop,
the identities they carry, every loss type selectable (and unknown ones refused), ArcFace centres
saved with the model, embeddings at inference, and a model without ``embed`` unchanged."""
from __future__ import annotations

import pytest
import torch

from gfl_det.embed_loss import LOSS_TYPES, EmbeddingLoss, select_best_positives
from gfl_det.models import build_detector
from gfl_det.postprocess import flatten_cls, gather_prior_rows
from gfl_det.structures import Targets

METAS = [dict(img_shape=(128, 160), pad_shape=(128, 160), scale_factor=(1.0, 1.0))] * 2
EMBED = dict(dim=16, stacked_convs=1, loss=dict(type='triplet', mining='facenet', margin=0.2,
                                                 synthesis='symmetrical'), max_per_gt=3)


def small_cfg(embed=None):
    return dict(backbone=dict(depth=18, base_channels=8, init_cfg=None),
                neck=dict(in_channels=[8, 16, 32, 64], out_channels=32),
                bbox_head=dict(num_classes=5, in_channels=32, feat_channels=32, stacked_convs=1,
                               **({} if embed is None else {'embed': embed})))


def small_model(embed=EMBED, seed=0):
    torch.manual_seed(seed)
    return build_detector(small_cfg(embed))


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, 160, generator=g)
    targets = Targets.from_lists(
        [torch.tensor([[10., 12., 70., 90.], [80., 20., 150., 60.], [5., 5., 30., 40.]]),
         torch.tensor([[40., 30., 120., 90.], [0., 0., 50., 50.]])],
        [torch.tensor([0, 3, 1]), torch.tensor([4, 0])],
        [torch.tensor([7, 8, 9]), torch.tensor([7, -1])])  # identity 7 in both images; one unknown
    return x, targets


@pytest.mark.parametrize('norm', [None, 'GN'])
def test_tower_gives_unit_vectors_per_location_and_only_its_keys(norm):
    model = small_model(dict(EMBED, norm=norm)).eval()  # the BN neck's running statistics: rows alike
    x = torch.randn(2, 3, 128, 160)
    out = model(x)
    tower = model.bbox_head.embed
    # None: the FPN maps themselves (the tower runs on the rows read); GN: the dense tower's features
    assert [tuple(e.shape) for e in out.embed] == [(2, 32, h, w) for h, w in out.level_shapes]
    dense = tower.dense_embeddings(model.neck(model.backbone(x)))  # the tower + 1x1 conv over every location
    assert [tuple(e.shape) for e in dense] == [(2, 16, h, w) for h, w in out.level_shapes]
    norms = torch.cat([e.norm(dim=1).flatten() for e in dense])
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # the rows computed alone equal the dense maps read afterwards: every location (borders and
    # corners of every level included), and a few out of order
    A = sum(h * w for h, w in out.level_shapes)
    b, a = torch.arange(2).repeat_interleave(A), torch.arange(A).repeat(2)
    assert torch.allclose(tower.rows(out.embed, b, a), flatten_cls(dense)[b, a], atol=1e-5)
    b, a = torch.tensor([1, 0, 1, 0]), torch.tensor([5, A - 3, A - 1, 0])
    assert torch.allclose(tower.rows(out.embed, b, a), flatten_cls(dense)[b, a], atol=1e-5)
    plain = small_model(embed=None)
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert list(plain.state_dict()) == [k for k in model.state_dict() if k in plain.state_dict()]
    assert extra and all(k.startswith('bbox_head.embed.') for k in extra)
    assert plain(torch.randn(1, 3, 128, 160)).embed is None and 'extra_terms' not in str(list(plain.state_dict()))


@pytest.mark.parametrize('norm', [None, 'GN'])
def test_feature_grad_scales_only_the_gradient_into_the_fpn(norm):
    """feature_grad=g: the same embeddings and tower gradients; the FPN maps get g x the gradient."""
    grads = {}
    for g in (1.0, 0.25, 0.0):
        model = small_model(dict(EMBED, stacked_convs=2, norm=norm, feature_grad=g)).eval()
        feats = [f.detach().requires_grad_() for f in model.neck(model.backbone(torch.randn(2, 3, 128, 160)))]
        tower = model.bbox_head.embed
        rows = tower.rows(tower(feats), torch.tensor([0, 1, 1]), torch.tensor([3, 200, 427]))
        (rows * torch.arange(16.)).sum().backward()
        grads[g] = (rows.detach(), [f.grad if f.grad is not None else torch.zeros_like(f) for f in feats],
                    [p.grad.clone() for p in tower.parameters()])
    for g in (0.25, 0.0):
        assert torch.equal(grads[g][0], grads[1.0][0])
        for got, want in zip(grads[g][1], grads[1.0][1]):
            assert torch.allclose(got, g * want, atol=1e-7)
        for got, want in zip(grads[g][2], grads[1.0][2]):
            assert torch.allclose(got, want, atol=1e-6)
    assert any(w.abs().sum() > 0 for w in grads[1.0][1])


def test_bn_neck_standardises_the_rows_read_in_training():
    model = small_model(dict(EMBED, stacked_convs=2))  # training mode
    tower = model.bbox_head.embed
    feats = model.neck(model.backbone(torch.randn(2, 3, 128, 160)))
    b, a = torch.arange(2).repeat_interleave(40), torch.arange(0, 400, 10).repeat(2)
    rows = gather_prior_rows(tower.dense(tower(feats)), b, a)  # (80, F) the tower's features, ReLU: all >= 0
    assert (rows >= 0).all() and rows.mean(0).abs().max() > 0  # one shared mean direction ...
    bn = tower.bn_neck
    standard = (rows - rows.mean(0)) / (rows.var(0, unbiased=False) + bn.eps).sqrt()
    want = torch.nn.functional.normalize(standard @ tower.out.weight.flatten(1).t() + tower.out.bias, dim=1)
    assert torch.allclose(tower.project(rows), want, atol=1e-5)  # ... removed over the batch's rows
    assert torch.allclose(bn.running_mean, 0.1 * rows.mean(0).detach(), atol=1e-6)  # and remembered
    one = tower.project(rows[:1])  # a single row (no batch statistics): the running ones, as in eval
    model.eval()
    assert torch.allclose(one, tower.project(rows[:1]), atol=1e-6)
    assert 'bbox_head.embed.bn_neck.running_mean' in model.state_dict()
    assert not any('bn_neck' in k for k in small_model(dict(EMBED, bn_neck=False)).state_dict())


def test_sparse_tower_gradient_equals_the_dense_towers():
    """norm=None: the loss's gradient through the N patches is the dense tower's, read at N rows."""
    model = small_model(dict(EMBED, stacked_convs=2)).eval()
    feats = [f.detach().requires_grad_() for f in model.neck(model.backbone(torch.randn(2, 3, 128, 160)))]
    tower = model.bbox_head.embed
    b, a = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 7, 300, 400, 427])  # of 428 priors: corners, P7
    w = torch.randn(5, 16)
    (tower.rows(tower(feats), b, a) * w).sum().backward()
    sparse = [f.grad.clone() for f in feats] + [p.grad.clone() for p in tower.parameters()]
    for t in feats + list(tower.parameters()):
        t.grad = None
    (flatten_cls(tower.dense_embeddings(feats))[b, a] * w).sum().backward()
    dense = [f.grad for f in feats] + [p.grad for p in tower.parameters()]
    for g, h in zip(sparse, dense):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-5), (g - h).abs().max()


def brute_force_selection(pos, assigned, quality, k):
    """Per image, per gt: its positives sorted by (-quality, prior index), the first k."""
    rows = []
    B, A = pos.shape
    for b in range(B):
        for g in range(int(assigned.max()) + 1):
            mine = [a for a in range(A) if pos[b, a] and assigned[b, a] == g]
            mine.sort(key=lambda a: (-quality[b, a].item(), a))
            rows += [(b, a) for a in mine[:k]]
    return sorted(rows)


@pytest.mark.parametrize('k', [1, 3, 100])
def test_best_positives_equal_a_brute_force_loop(k):
    g = torch.Generator().manual_seed(k)
    B, A, G = 3, 400, 6
    assigned = torch.randint(-1, G, (B, A), generator=g)
    pos = (assigned >= 0) & (torch.rand(B, A, generator=g) > 0.2)
    quality = torch.rand(B, A, generator=g).round(decimals=1)  # many ties: broken by prior index
    b, a = select_best_positives(pos, assigned, quality, k)
    assert sorted(zip(b.tolist(), a.tolist())) == brute_force_selection(pos, assigned, quality, k)
    # given the number of gt slots (as the loss does: no read of assigned.max()), the same rows
    for num_gt in (G, G + 5):
        b2, a2 = select_best_positives(pos, assigned, quality, k, num_gt=num_gt)
        assert torch.equal(b2, b) and torch.equal(a2, a)


def test_selection_on_a_real_assignment_and_the_identities_it_carries():
    model = small_model()
    x, targets = batch()
    out = model(x)
    crit = model.criterion
    t = crit.prior_targets(out, targets, METAS)
    p = crit.positives(out, t)
    b, a = select_best_positives(t.pos, t.assigned, p.quality, 3)
    assert sorted(zip(b.tolist(), a.tolist())) == brute_force_selection(t.pos, t.assigned, p.quality, 3)
    gts = t.assigned[b, a]
    assert torch.bincount(b * 10 + gts).max() <= 3 and len(set(zip(b.tolist(), gts.tolist()))) == 5
    ids = targets.ids[b, gts]
    assert set(ids.tolist()) == {7, 8, 9, -1}  # the unknown one is dropped by the loss, not here
    flat = flatten_cls(out.embed)  # (B, A, C')
    assert torch.equal(gather_prior_rows(out.embed, b, a), flat[b, a])


@pytest.mark.parametrize('loss', [
    dict(type='triplet', mining=m, margin=0.2) for m in ('all', 'semihard', 'hard', 'batch-hard', 'facenet')] + [
    dict(type='triplet', mining='facenet', synthesis='symmetrical'),
    dict(type='contrastive', pos_margin=0.0, neg_margin=1.0),
    dict(type='npair', scale=8.0, synthesis='symmetrical'),
    dict(type='arcface', num_ids=10, scale=16.0, margin=0.3),
    dict(type='siamese', neg_per_pos=1.0)])
def test_every_loss_type_trains_the_tower(loss):
    model = small_model(dict(EMBED, loss=loss))
    x, targets = batch()
    losses = model.loss(x, targets, METAS)
    assert set(losses) == {'loss_cls', 'loss_bbox', 'loss_dfl', 'loss_embed', 'embed_active_triplets'}
    assert torch.isfinite(losses['loss_embed']) and 0 <= losses['embed_active_triplets'] <= 1
    losses['loss_embed'].backward()
    assert model.bbox_head.embed.out.weight.grad.abs().sum() > 0
    assert model.bbox_head.gfl_cls.weight.grad is None  # the embedding loss reaches only its own tower (and FPN)


def test_arcface_centres_are_saved_with_the_model():
    model = small_model(dict(EMBED, loss=dict(type='arcface', num_ids=10)))
    sd = model.state_dict()
    assert tuple(sd['criterion.extra_terms.embed.arcface.weight'].shape) == (10, 16)
    again = small_model(dict(EMBED, loss=dict(type='arcface', num_ids=10)), seed=1)
    again.load_state_dict(sd)
    assert torch.equal(again.criterion.extra_terms['embed'].arcface.weight, sd['criterion.extra_terms.embed.arcface.weight'])
    x, targets = batch()
    targets.ids[0, 0] = 12
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 10\)'):
        model.loss(x, targets, METAS)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"bbox_head.embed.loss: type 'cosface' is not implemented.*'triplet'"):
        small_model(dict(EMBED, loss=dict(type='cosface')))
    with pytest.raises(ValueError, match=r"bbox_head.embed.loss \(triplet\).mining='semi'"):
        small_model(dict(EMBED, loss=dict(type='triplet', mining='semi')))
    with pytest.raises(ValueError, match='needs num_ids'):
        small_model(dict(EMBED, loss=dict(type='arcface')))
    with pytest.raises(ValueError, match=r"bbox_head.embed.norm='BN' is not implemented.*None, 'GN'"):
        small_model(dict(EMBED, norm='BN'))
    with pytest.raises(ValueError, match='bbox_head.embed.size is not an option'):
        small_model(dict(EMBED, size=3))
    with pytest.raises(ValueError, match='max_per_gt'):
        EmbeddingLoss(8, max_per_gt=0)
    assert set(LOSS_TYPES) == {'triplet', 'contrastive', 'npair', 'arcface', 'siamese'}


def test_batch_without_identities_is_refused_and_empty_batches_train():
    model = small_model()
    x, targets = batch()
    with pytest.raises(ValueError, match="no identities.*'instance_id'.*views=2"):
        model.loss(x, Targets(targets.boxes, targets.labels, targets.valid), METAS)
    empty = Targets(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool),
                    torch.zeros(2, 0, dtype=torch.long))
    losses = model.loss(x, empty, METAS)
    assert losses['loss_embed'].item() == 0
    losses['loss_embed'].backward()


def test_active_fraction_counts_margin_violations():
    term = EmbeddingLoss(2)
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    ids = torch.tensor([0, 0, 1, 1])
    assert term.active_fraction(emb, ids).item() == 0.0  # every positive at 0, negatives at sqrt 2
    assert term.active_fraction(emb, torch.tensor([0, 1, 0, 1])).item() == 1.0  # positives farther than negatives


def test_inference_returns_each_detections_embedding():
    model = small_model().eval()
    with torch.no_grad():
        model.bbox_head.gfl_cls.bias.fill_(0.0)  # scores ~0.5: plenty of detections
        x, _ = batch()
        dets = model.predict(x, METAS)
        flat = flatten_cls(model.bbox_head.embed.dense_embeddings(model.neck(model.backbone(x))))
    for i, d in enumerate(dets):
        assert len(d['bboxes']) > 10 and d['embeddings'].shape == (len(d['bboxes']), 16)
        assert torch.allclose(d['embeddings'], flat[i, d['prior_idx']], atol=1e-6)
