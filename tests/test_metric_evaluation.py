"""gfl_det.metric.evaluation: Recall@K by brute force, NMI against scikit-learn, the pairwise F1
against scikit-learn's pair confusion matrix, k-means, and the verification protocol by hand."""
import math

import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import pair_confusion_matrix

from gfl_det.metric import clustering_metrics, retrieval_metrics, verification_metrics, verification_pairs
from gfl_det.metric import evaluation
from gfl_det.metric.evaluation import kmeans, knn, nmi, pairwise_f1


def _brute_recall(emb, labels, k):
    """Fraction of queries (with another sample of their identity) having one among their k
    nearest others; nearest by distance, then by index."""
    hits, total = 0, 0
    for q in range(len(emb)):
        if (labels == labels[q]).sum() < 2:
            continue
        d = [((emb[q] - emb[r]).norm().item(), r) for r in range(len(emb)) if r != q]
        nearest = [r for _, r in sorted(d)[:k]]
        hits += any(labels[r] == labels[q] for r in nearest)
        total += 1
    return hits / total


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_at_k_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randint(0, 3, (60, 2), generator=g).float()  # a coarse grid: many ties
    labels = torch.randint(0, 6, (60,), generator=g)
    labels[0] = 99  # a lone query, left out
    recall = retrieval_metrics(emb, labels)["recall_at_k"]
    for k in (1, 2, 4, 8):
        assert recall[k] == pytest.approx(_brute_recall(emb, labels, k), abs=1e-12)
    assert recall[1] <= recall[2] <= recall[4] <= recall[8]


def test_retrieval_by_hand():
    # 1-D points; query 0 (label A) has neighbours 1 (B), 2 (A), 3 (A): R = 2,
    # R-precision = 1/2, MAP@R = (0 + 1/2) / 2 = 1/4
    emb = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    labels = torch.tensor([0, 1, 0, 0, 1])
    _, idx = knn(emb, 4)
    assert idx[0].tolist() == [1, 2, 3, 4]
    m = retrieval_metrics(emb[:1], labels[:1], emb[1:], labels[1:])
    assert m["precision_at_1"] == 0.0 and m["r_precision"] == 0.5 and m["map_at_r"] == 0.25
    assert m["recall_at_k"] == {1: 0.0, 2: 1.0, 4: 1.0, 8: 1.0}


def test_knn_chunks_and_ties_are_exact(monkeypatch):
    g = torch.Generator().manual_seed(2)
    emb = torch.randint(0, 2, (50, 2), generator=g).float()
    whole = knn(emb, 10)
    monkeypatch.setattr(evaluation, "CHUNK_ELEMENTS", 3 * 50)  # 3 queries per chunk
    chunked = knn(emb, 10)
    assert torch.equal(whole[1], chunked[1])
    assert all((row[:-1] <= row[1:]).all() for row in whole[0])  # nearest first
    for q in range(50):  # equal distances in reference order, the query never its own neighbour
        assert q not in whole[1][q].tolist()
        d, i = whole[0][q], whole[1][q]
        assert all(i[t] < i[t + 1] for t in range(9) if d[t] == d[t + 1])


def test_faiss_backend_matches_torch():
    pytest.importorskip("faiss", reason="faiss is optional")
    g = torch.Generator().manual_seed(3)
    emb, labels = torch.randn(80, 8, generator=g), torch.randint(0, 5, (80,), generator=g)
    ours, theirs = retrieval_metrics(emb, labels), retrieval_metrics(emb, labels, backend="faiss")
    assert theirs.pop("recall_at_k") == pytest.approx(ours.pop("recall_at_k"))
    assert theirs == pytest.approx(ours)
    q = torch.randn(7, 8, generator=g)
    torch.testing.assert_close(knn(q, 5, emb, backend="faiss")[0], knn(q, 5, emb)[0], rtol=1e-4, atol=1e-4)


def test_faiss_missing_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match="faiss-cpu"):
        knn(torch.randn(5, 2), 2, backend="faiss")


@pytest.mark.parametrize("seed", range(5))
def test_nmi_equals_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 1 + seed * 2, (200,), generator=g)
    b = torch.randint(0, 4, (200,), generator=g) + 10 * a * (seed % 2)  # partly aligned
    assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a.numpy(), b.numpy()), abs=1e-12)
    assert pairwise_f1(a, a) == 1.0


@pytest.mark.parametrize("a,b", [([0, 0, 0], [1, 1, 1]), ([0, 0, 1, 1], [5, 5, 3, 3]),
                                 ([0, 0, 0, 0], [0, 1, 2, 3]), ([0, 1, 2], [0, 1, 2])])
def test_nmi_edge_cases_equal_sklearn(a, b):
    assert nmi(torch.tensor(a), torch.tensor(b)) == pytest.approx(normalized_mutual_info_score(a, b))


@pytest.mark.parametrize("seed", range(4))
def test_pairwise_f1_against_sklearn_pair_confusion(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 5, (120,), generator=g), torch.randint(0, 4, (120,), generator=g)
    b[:60] = a[:60]
    (tn, fp), (fn, tp) = pair_confusion_matrix(a.numpy(), b.numpy())  # ordered pairs: x2
    assert pairwise_f1(a, b) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)


def test_pairwise_f1_by_hand():
    # true {0,1,2} {3}; clusters {0,1} {2,3}: TP = 1 (0-1), true pairs 3, predicted pairs 2
    f1 = pairwise_f1(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1]))
    assert f1 == pytest.approx(2 * 1 / (3 + 2))


def test_kmeans_recovers_separated_blobs_and_is_as_good_as_sklearn():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=g) * 10
    labels = torch.arange(5).repeat_interleave(40)
    x = centres[labels] + torch.randn(200, 8, generator=g)
    m = clustering_metrics(x, labels)
    assert m["nmi"] == pytest.approx(1.0) and m["f1"] == pytest.approx(1.0)
    noise = torch.randn(300, 4, generator=g).double()
    ours = kmeans(noise, 6, seed=0)
    inertia = lambda assign: sum(((noise[assign == c] - noise[assign == c].mean(0)) ** 2).sum()  # noqa: E731
                                 for c in assign.unique()).item()
    sk = KMeans(6, n_init=4, random_state=0).fit(noise.numpy())
    assert inertia(ours) <= 1.02 * sk.inertia_
    assert torch.equal(ours, kmeans(noise, 6, seed=0))  # reproducible from the seed


def test_verification_by_hand():
    # same pairs at 0.1, 0.2, 0.3, 0.9; different at 0.5, 0.6, 0.7, 0.8: the best rule accepts
    # d <= 0.4 (7 of 8 right); TAR at FAR 1e-3 (no false accept allowed among 4): 3 of 4
    dist = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.5, 0.6, 0.7, 0.8])
    same = torch.tensor([True] * 4 + [False] * 4)
    m = verification_metrics(dist, same, folds=2)
    assert m["tar_at_far_1e-3"] == 0.75
    assert evaluation._best_threshold(dist, same) == pytest.approx(0.4)
    # leave-one-out: each held-out pair judged by the threshold of the other 7; only 0.9 is wrong
    loo = verification_metrics(dist, same, folds=8)
    assert loo["accuracy"] == pytest.approx(7 / 8)


def test_verification_cross_validation_against_grid_search():
    g = torch.Generator().manual_seed(1)
    same = torch.rand(400, generator=g) < 0.5
    dist = torch.where(same, 0.8, 1.2) + 0.3 * torch.randn(400, generator=g)
    m = verification_metrics(dist, same, folds=10, seed=3)
    order = torch.randperm(400, generator=torch.Generator().manual_seed(3))
    grid = torch.linspace(dist.min().item() - 0.01, dist.max().item() + 0.01, 20001)
    accs = []
    for test in torch.tensor_split(order, 10):
        train = torch.ones(400, dtype=torch.bool)
        train[test] = False
        acc = ((dist[train][None, :] <= grid[:, None]) == same[train][None, :]).float().mean(1)
        t = grid[acc.argmax()]
        accs.append(((dist[test] <= t) == same[test]).float().mean().item())
    assert m["accuracy"] == pytest.approx(sum(accs) / 10, abs=0.01)
    assert 0.7 < m["accuracy"] < 0.9 and 0.8 < m["threshold"] < 1.2


def test_verification_pairs_are_balanced_and_reproducible():
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(60, 3, generator=g), torch.arange(6).repeat(10)
    dist, same = verification_pairs(emb, labels, seed=1)
    assert int(same.sum()) == int((~same).sum()) == 6 * 45
    dist2, same2 = verification_pairs(emb, labels, seed=1)
    assert torch.equal(dist, dist2) and torch.equal(same, same2)
    assert (dist > 0).all() and math.isfinite(dist.sum().item())


def test_bad_input():
    with pytest.raises(ValueError, match="bool"):
        verification_metrics(torch.rand(4), torch.tensor([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="both"):
        retrieval_metrics(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.randn(3, 2))
    with pytest.raises(ValueError, match="D = 2"):
        retrieval_metrics(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.randn(3, 3),
                          torch.zeros(3, dtype=torch.long))
