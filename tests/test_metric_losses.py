"""gfl_det.metric losses: FaceNet mining against TensorFlow's triplet_semihard_loss written out,
hand-worked ArcFace and Siamese values, gradcheck in float64, empty and degenerate batches,
bad input, and O(N^2) memory."""
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gfl_det.metric import (MINING, ArcFaceLoss, SiameseBinaryHead, contrastive_loss, npair_loss,
                            siamese_binary_loss, triplet_loss)
from gfl_det.metric.siamese import siamese_pairs


def _tf_triplet_semihard_loss(labels, emb, margin):
    """TensorFlow Addons' triplet_semihard_loss (distance_metric='L2'), op for op in numpy
    (its (N*N, N) tiles included), on L2-normalised embeddings."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sq = np.maximum((x ** 2).sum(1)[:, None] + (x ** 2).sum(1)[None, :] - 2 * x @ x.T, 0.0)
    error_mask = sq <= 0.0
    pdist = np.sqrt(sq + error_mask * 1e-16) * (1.0 - error_mask)
    pdist = pdist * (1.0 - np.eye(len(x)))
    n = len(labels)
    adjacency = labels[:, None] == labels[None, :]
    adjacency_not = ~adjacency
    pdist_tile = np.tile(pdist, (n, 1))  # (N*N, N)
    mask = np.tile(adjacency_not, (n, 1)) & (pdist_tile > pdist.T.reshape(-1, 1))

    def masked_minimum(data, m):
        axis_max = data.max(1, keepdims=True)
        return ((data - axis_max) * m).min(1, keepdims=True) + axis_max

    def masked_maximum(data, m):
        axis_min = data.min(1, keepdims=True)
        return ((data - axis_min) * m).max(1, keepdims=True) + axis_min

    mask_final = (mask.sum(1, keepdims=True) > 0).reshape(n, n).T
    negatives_outside = masked_minimum(pdist_tile, mask).reshape(n, n).T
    negatives_inside = np.tile(masked_maximum(pdist, adjacency_not), (1, n))
    semi_hard_negatives = np.where(mask_final, negatives_outside, negatives_inside)
    loss_mat = margin + pdist - semi_hard_negatives
    mask_positives = adjacency.astype(float) - np.eye(n)
    return np.maximum(loss_mat * mask_positives, 0.0).sum() / mask_positives.sum()


@pytest.mark.parametrize("seed", range(4))
def test_facenet_equals_tensorflow_triplet_semihard_loss(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (40,), generator=g)
    emb = torch.randn(40, 6, generator=g, dtype=torch.float64)
    ours = triplet_loss(emb, labels, margin=0.5, mining="facenet").item()
    tf = _tf_triplet_semihard_loss(labels.numpy(), emb.numpy(), 0.5)
    assert tf > 0 and ours == pytest.approx(tf, rel=1e-9)


def test_facenet_squared_distances():
    """mining='facenet', squared=True is the original tf.contrib loss (squared L2): same
    selection, on d^2; checked against the selection spelled out on a 4-point example."""
    emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    d2 = torch.cdist(emb, emb) ** 2
    # pairs (0,1), (1,0), (2,3), (3,2): the nearest negative farther than the positive, else the farthest
    losses = []
    for a, p in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        negs = d2[a][labels != labels[a]]
        above = negs[negs > d2[a, p]]
        losses.append(max(d2[a, p] - (above.min() if len(above) else negs.max()) + 0.5, 0.0))
    expected = sum(losses) / 4
    assert expected > 0
    assert triplet_loss(emb, labels, 0.5, "facenet", squared=True).item() == pytest.approx(float(expected))


def test_arcface_by_hand_beyond_pi():
    """Embedding opposite its class centre: theta_y = pi > pi - m, so the target logit is
    s (cos theta - m sin m) = s (-1 - m sin m); the other class at 90 degrees has logit 0."""
    arc = ArcFaceLoss(2, 2, scale=4.0, margin=0.5)
    with torch.no_grad():
        arc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    emb = torch.tensor([[-2.0, 0.0]], requires_grad=True)
    target = 4.0 * (-1.0 - 0.5 * math.sin(0.5))
    expected = -target + math.log(math.exp(target) + 1.0)  # cross-entropy with logits (target, 0)
    assert arc(emb, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)
    # inside the range: theta_y = 60 degrees -> s cos(60 deg + m)
    emb = torch.tensor([[0.5, math.sqrt(3) / 2]])
    target, other = 4.0 * math.cos(math.pi / 3 + 0.5), 4.0 * math.sqrt(3) / 2
    expected = -target + math.log(math.exp(target) + math.exp(other))
    assert arc(emb, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_siamese_head_by_hand():
    head = SiameseBinaryHead(3)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[-1.0, -2.0, 0.5]]))
        head.fc.bias.fill_(1.0)
    e1, e2 = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[1.0, 1.5, 0.0]])
    # |diff| = (1, 0.5, 2): -1 - 1 + 1 + 1 = 0 -> p(same) = 0.5
    assert head(e1, e2).item() == pytest.approx(0.0)
    assert torch.sigmoid(head(e1, e1)).item() == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_siamese_pairs_all_positives_and_hardest_negatives():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 0.05]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    i, j, targets = siamese_pairs(emb, labels, neg_per_pos=1.0)
    pairs = sorted(zip(i.tolist(), j.tolist(), targets.tolist()))
    # positives (0,1), (2,3); the two nearest negative pairs: (0,4) and (1,4)
    assert pairs == [(0, 1, 1.0), (0, 4, 0.0), (1, 4, 0.0), (2, 3, 1.0)]
    head = SiameseBinaryHead(2)
    x = torch.nn.functional.normalize(emb)
    logits = head(x[i], x[j])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert siamese_binary_loss(emb, labels, head).item() == pytest.approx(expected.item())


def _losses(dtype=torch.float64):
    """Every loss as f(emb, labels) -> scalar."""
    torch.manual_seed(0)
    arc = ArcFaceLoss(6, 4).to(dtype)
    head = SiameseBinaryHead(4).to(dtype)
    fns = {f"triplet-{m}-{s}": (lambda e, y, m=m, s=s: triplet_loss(e, y, 0.4, m, s))
           for m in MINING for s in (None, "symmetrical")}
    fns["contrastive"] = lambda e, y: contrastive_loss(e, y, 0.1, 1.2)
    h = lambda e: len(e) // 2  # noqa: E731  pairs (e_i, e_{h+i})
    fns["npair"] = lambda e, y: npair_loss(e[:h(e)], e[h(e):2 * h(e)], y[:h(e)], 2.0)
    fns["symm-npair"] = lambda e, y: npair_loss(e[:h(e)], e[h(e):2 * h(e)], y[:h(e)], 2.0, "symmetrical")
    fns["arcface"] = lambda e, y: arc(e, y)
    fns["siamese"] = lambda e, y: siamese_binary_loss(e, y, head, 1.0)
    return fns


@pytest.mark.parametrize("name", list(_losses()))
def test_gradcheck_float64(name):
    fn = _losses()[name]
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 4, 5])  # npair pairs: (i, i + 5) share labels 0..2
    emb = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert fn(emb, labels).item() > 0
    assert torch.autograd.gradcheck(lambda e: fn(e, labels), (emb,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", list(_losses(torch.float32)))
@pytest.mark.parametrize("batch", ["empty", "one", "no-positives", "no-negatives", "duplicates"])
def test_degenerate_batches_give_zero_loss_with_gradient(name, batch):
    fn = _losses(torch.float32)[name]
    emb = {"empty": torch.zeros(0, 4), "one": torch.randn(1, 4), "no-positives": torch.randn(6, 4),
           "no-negatives": torch.randn(6, 4), "duplicates": torch.ones(6, 4)}[batch].requires_grad_()
    labels = {"empty": torch.zeros(0, dtype=torch.long), "one": torch.tensor([2]),
              "no-positives": torch.arange(6), "no-negatives": torch.full((6,), 3),
              "duplicates": torch.tensor([0, 1, 0, 1, 0, 1])}[batch]
    loss = fn(emb, labels)
    loss.backward()
    assert math.isfinite(loss.item()) and bool(torch.isfinite(emb.grad).all())
    nothing_to_learn = batch in ("empty", "one", "no-positives", "no-negatives")  # no triplet
    if name.startswith("triplet") and nothing_to_learn or name == "siamese" and batch != "duplicates" \
            and batch != "no-negatives":  # siamese: no positive pair, so no pair at all
        assert loss.item() == 0.0 and not emb.grad.any()


@pytest.mark.parametrize("bad,match", [
    (lambda: (torch.randn(4), torch.zeros(4, dtype=torch.long)), "shape"),
    (lambda: (torch.randn(4, 3), torch.zeros(4)), "int64"),
    (lambda: (torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long)), "shape"),
    (lambda: (torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), "N = 4"),
    (lambda: (torch.tensor([[0.0, float("nan")]] * 2), torch.zeros(2, dtype=torch.long)), "NaN"),
    (lambda: (torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long)), "floating"),
])
def test_bad_input_is_a_clear_value_error(bad, match):
    emb, labels = bad()
    for fn in (lambda: triplet_loss(emb, labels), lambda: contrastive_loss(emb, labels),
               lambda: siamese_binary_loss(emb, labels, SiameseBinaryHead(3))):
        with pytest.raises(ValueError, match=match):
            fn()
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), mining="hardest")
    with pytest.raises(ValueError, match="positive has N = 3"):
        npair_loss(torch.randn(2, 3), torch.randn(3, 3), torch.arange(2))
    with pytest.raises(ValueError, match="positive 4"):
        npair_loss(torch.randn(2, 3), torch.randn(2, 4), torch.arange(2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ArcFaceLoss(3, 3)(torch.randn(2, 3), torch.tensor([0, 3]))


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation returns."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mining", MINING)
def test_memory_is_quadratic_not_cubic(mining):
    """No tensor of a forward + backward pass holds more than ~N^2 elements (N = 256, 32
    identities; the 'all' triplets alone are N * 7 * 224 = 400k > 2 N^2)."""
    n = 256
    labels = torch.arange(n) % 32
    emb = torch.randn(n, 16, requires_grad=True)
    with _LargestTensor() as mode:
        triplet_loss(emb, labels, 0.2, mining).backward()
    assert mode.largest <= n * n
    # under synthesis the negatives are the U = 32 * 28 pairs: at most 4 N U candidate distances
    with _LargestTensor() as mode:
        triplet_loss(emb, labels, 0.2, mining, "symmetrical").backward()
    assert mode.largest <= 4 * n * 32 * 28


def test_4096_embeddings_in_one_call():
    labels = torch.arange(4096) % 64
    emb = torch.randn(4096, 128, requires_grad=True)
    loss = triplet_loss(emb, labels, 0.2, "semihard")
    loss.backward()
    assert loss.item() > 0 and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("mining", ["batch-hard", "facenet"])
def test_mining_in_anchor_blocks_equals_one_block(monkeypatch, mining):
    """The one-triplet-per-pair modes mine a block of anchor rows at a time; blocks of 7 rows
    (several, the last partial) pick the same triplets as one block of all rows."""
    import gfl_det.metric.triplet as tri
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(40, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (40,), generator=g)
    results = []
    for elements in (10 ** 9, 7 * 40):
        monkeypatch.setattr(tri, "PICK_CHUNK_ELEMENTS", elements)
        e = emb.clone().requires_grad_()
        loss = tri.triplet_loss(e, labels, margin=0.3, mining=mining)
        loss.backward()
        results.append((loss.detach(), e.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][0] > 0
