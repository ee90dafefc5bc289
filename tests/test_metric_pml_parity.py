"""gfl_det.metric against pytorch-metric-learning 2.9.0 (the issue's oracle; a test dependency
only): every loss / miner pair and the retrieval metrics, values and gradients, on random
embeddings, exact ties, single-member identities, a single identity, D = 2 and D = 512."""
import math

import pytest
import torch

pml = pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning==2.9.0 is the oracle")
from pytorch_metric_learning import distances, losses, miners  # noqa: E402
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # noqa: E402
from pytorch_metric_learning.utils.inference import CustomKNN, return_results  # noqa: E402

from gfl_det.metric import ArcFaceLoss, contrastive_loss, npair_loss, retrieval_metrics, triplet_loss  # noqa: E402


def _case(name: str, seed: int = 0):
    """(emb (N, D) float64, labels (N,) int64) of one kind of batch."""
    g = torch.Generator().manual_seed(seed)
    if name == "random":
        return torch.randn(64, 16, generator=g, dtype=torch.float64), torch.randint(0, 8, (64,), generator=g)
    if name == "ties":  # duplicated rows and a coarse grid: many exactly equal distances
        emb = torch.randint(-1, 2, (24, 3), generator=g).double()
        emb[emb.abs().sum(1) == 0] = 1.0
        return torch.cat([emb, emb[:8]]), torch.randint(0, 4, (32,), generator=g)
    if name == "single-members":  # identities 10..19 have one sample each
        labels = torch.cat([torch.arange(10, 20), torch.randint(0, 4, (30,), generator=g)])
        return torch.randn(40, 8, generator=g, dtype=torch.float64), labels
    if name == "one-identity":
        return torch.randn(20, 8, generator=g, dtype=torch.float64), torch.zeros(20, dtype=torch.long)
    if name == "d2":
        return torch.randn(100, 2, generator=g, dtype=torch.float64), torch.randint(0, 5, (100,), generator=g)
    if name == "d512":
        return torch.randn(48, 512, generator=g, dtype=torch.float64), torch.randint(0, 6, (48,), generator=g)
    raise ValueError(name)


CASES = ["random", "ties", "single-members", "one-identity", "d2", "d512"]


def _both(ours, theirs, emb):
    """Loss values and embedding gradients of our function and PML's on copies of emb."""
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    l1, l2 = ours(e1), theirs(e2)
    l1.backward()
    l2.backward()
    return l1.item(), l2.item(), e1.grad, e2.grad


def _assert_same(ours, theirs, emb, rtol=1e-9, atol=1e-12):
    v1, v2, g1, g2 = _both(ours, theirs, emb)
    assert v1 == pytest.approx(v2, rel=rtol, abs=atol)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
    return v1


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["all", "semihard", "hard"])
def test_triplet_margin_miner_kinds(case, kind):
    emb, labels = _case(case)
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets=kind)
    loss = losses.TripletMarginLoss(margin=0.2)
    v = _assert_same(lambda e: triplet_loss(e, labels, 0.2, kind), lambda e: loss(e, labels, miner(e, labels)), emb)
    if case in ("random", "d2", "d512"):
        assert v > 0  # the comparison saw real triplets


@pytest.mark.parametrize("case", CASES)
def test_triplet_batch_hard(case):
    emb, labels = _case(case)
    miner, loss = miners.BatchHardMiner(), losses.TripletMarginLoss(margin=0.2)
    v = _assert_same(lambda e: triplet_loss(e, labels, 0.2, "batch-hard"),
                     lambda e: loss(e, labels, miner(e, labels)), emb)
    assert (v > 0) == (case != "one-identity")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("margins", [(0.0, 1.0), (0.3, 1.2)])
def test_contrastive(case, margins):
    emb, labels = _case(case)
    loss = losses.ContrastiveLoss(pos_margin=margins[0], neg_margin=margins[1])
    v = _assert_same(lambda e: contrastive_loss(e, labels, *margins), lambda e: loss(e, labels), emb)
    assert v > 0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("margin,scale", [(0.5, 64.0), (1.2, 16.0), (2.5, 8.0)])
def test_arcface(case, margin, scale):
    emb, labels = _case(case)
    classes = int(labels.max()) + 1
    theirs = losses.ArcFaceLoss(classes, emb.shape[1], margin=math.degrees(margin), scale=scale).double()
    ours = ArcFaceLoss(classes, emb.shape[1], scale=scale, margin=margin).double()
    with torch.no_grad():
        ours.weight.copy_(theirs.W.T)  # PML stores the centres as (D, C)
    _assert_same(lambda e: ours(e, labels), lambda e: theirs(e, labels), emb)
    torch.testing.assert_close(ours.weight.grad, theirs.W.grad.T)


@pytest.mark.parametrize("pairs,dim", [(8, 16), (30, 2), (5, 512)])
def test_npair_distinct_labels(pairs, dim):
    """PML's NPairsLoss takes one anchor-positive pair per label from a batch; with distinct
    labels that is our loss with one-hot targets."""
    g = torch.Generator().manual_seed(pairs)
    anchor = torch.randn(pairs, dim, generator=g, dtype=torch.float64)
    positive = torch.randn(pairs, dim, generator=g, dtype=torch.float64)
    labels = torch.randperm(pairs, generator=g) + 3
    both = torch.cat([anchor, positive])
    v = _assert_same(lambda e: npair_loss(e[:pairs], e[pairs:], labels),
                     lambda e: losses.NPairsLoss()(e, torch.cat([labels, labels])), both)
    assert v > 0


class _StableKNN:
    """PML's CustomKNN with a stable sort instead of topk, so equal distances come in reference
    order (our order) and the tie cases compare the metrics, not two tie-breaking rules."""

    def __call__(self, query, k, reference, ref_includes_query=False):
        k = k + int(ref_includes_query)
        d, i = torch.cdist(query, reference).sort(dim=1, stable=True)
        return return_results(d[:, :k], i[:, :k], ref_includes_query)


def _pml_retrieval(query, query_labels, ref=None, ref_labels=None, knn=None):
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              device=torch.device("cpu"),
                              knn_func=knn or CustomKNN(distances.LpDistance(normalize_embeddings=False)))
    return calc.get_accuracy(query, query_labels, ref, ref_labels)


@pytest.mark.parametrize("case", CASES)
def test_retrieval_metrics_self_search(case):
    emb, labels = _case(case)
    emb = emb.float()
    knn = _StableKNN() if case == "ties" else None  # default PML kNN elsewhere
    theirs = _pml_retrieval(emb, labels, knn=knn)
    ours = retrieval_metrics(emb, labels)
    for ours_key, their_key in [("precision_at_1", "precision_at_1"), ("r_precision", "r_precision"),
                                ("map_at_r", "mean_average_precision_at_r")]:
        assert ours[ours_key] == pytest.approx(theirs[their_key], abs=1e-12), ours_key
    assert ours["recall_at_k"][1] == pytest.approx(theirs["precision_at_1"], abs=1e-12)


def test_retrieval_metrics_ties_depend_only_on_order():
    """With PML's own kNN (topk) on embeddings whose ties sit only inside identities, the order
    among equal distances cannot change the metrics: both libraries agree exactly."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 4, generator=g)
    labels = torch.arange(6).repeat_interleave(5)
    emb = centres[labels] + 0.01 * torch.randn(30, 4, generator=g)
    emb[::5] = emb[1::5]  # an exact duplicate inside each identity
    theirs, ours = _pml_retrieval(emb, labels), retrieval_metrics(emb, labels)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_separate_references(seed):
    g = torch.Generator().manual_seed(seed)
    query, query_labels = torch.randn(40, 6, generator=g), torch.randint(0, 6, (40,), generator=g)
    ref, ref_labels = torch.randn(70, 6, generator=g), torch.randint(0, 5, (70,), generator=g)  # label 5: lone
    theirs = _pml_retrieval(query, query_labels, ref, ref_labels)
    ours = retrieval_metrics(query, query_labels, ref, ref_labels)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)
