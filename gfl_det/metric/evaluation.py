"""Evaluating an embedding for the three uses FaceNet names: retrieval (recognition by nearest
neighbours), clustering, verification (same / different by a distance threshold).

- ``retrieval_metrics``: Recall@K (K = 1, 2, 4, 8, the Symm paper's columns), precision@1,
  R-precision and MAP@R (Musgrave et al. 2020, "A Metric Learning Reality Check"), equal to
  pytorch-metric-learning's AccuracyCalculator. A query's own row is never one of its references;
  queries whose identity has no reference are left out, as PML does.
- ``clustering_metrics``: k-means with k = number of identities, then NMI (scikit-learn's
  arithmetic normalisation) and the pairwise F1 (the Symm paper's two clustering columns).
- ``verification_metrics``: accuracy at a threshold chosen by 10-fold cross validation (the LFW
  protocol FaceNet reports) and the true-accept rate at a false-accept rate of 1e-3.

Nearest neighbours are exact, in torch, in chunks of queries (any N); ``backend='faiss'`` uses
faiss's exact IndexFlatL2 where faiss is installed. Distances are Euclidean on the embeddings as
given (normalise them first for losses that work on the hypersphere). Equal distances are ranked
by reference index (a stable sort), so results never depend on the hardware.
Shape legend: Q queries, R references, K neighbours, P pairs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .distance import check_embeddings

RECALL_KS = (1, 2, 4, 8)
CHUNK_ELEMENTS = 1 << 24  # query rows x references per chunk
FAR = 1e-3


def knn(query: Tensor, k: int, ref: Optional[Tensor] = None, backend: str = "torch") -> tuple[Tensor, Tensor]:
    """The k nearest references of every query: (distances (Q, k), indices (Q, k)), nearest first.
    ref None: the queries search each other, never themselves (k <= Q - 1)."""
    self_search = ref is None
    ref = query if self_search else ref
    k = min(k, len(ref) - int(self_search))
    if backend == "faiss":
        return _faiss_knn(query, k, ref, self_search)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}: use 'torch' or 'faiss'")
    rows = max(1, CHUNK_ELEMENTS // max(1, len(ref)))
    dists, indices = [], []
    for s in range(0, len(query), rows):
        d = torch.cdist(query[s:s + rows], ref)  # (B, R)
        if self_search:
            own = torch.arange(s, s + len(d), device=d.device)
            d[torch.arange(len(d), device=d.device), own] = math.inf  # never its own reference
        d, i = d.sort(dim=1, stable=True)  # ties: lower reference index first
        dists.append(d[:, :k])
        indices.append(i[:, :k])
    if not dists:
        return query.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=query.device)
    return torch.cat(dists), torch.cat(indices)


def _faiss_knn(query: Tensor, k: int, ref: Tensor, self_search: bool) -> tuple[Tensor, Tensor]:
    try:
        import faiss
    except ImportError as e:
        raise ImportError("backend='faiss' needs faiss (pip install faiss-cpu); the default "
                          "backend='torch' needs nothing") from e
    index = faiss.IndexFlatL2(ref.shape[1])
    index.add(ref.detach().float().cpu().contiguous().numpy())
    d2, i = index.search(query.detach().float().cpu().contiguous().numpy(), k + int(self_search))
    d, i = torch.from_numpy(d2).clamp(min=0).sqrt(), torch.from_numpy(i)
    if self_search:  # drop the query itself; where faiss did not return it, the farthest
        own = i == torch.arange(len(i))[:, None]  # (Q, k + 1)
        own[~own.any(1), -1] = True
        d, i = d[~own].view(len(i), k), i[~own].view(len(i), k)
    return d.to(query.device), i.to(query.device)


def retrieval_metrics(query_emb: Tensor, query_labels: Tensor, ref_emb: Optional[Tensor] = None,
                      ref_labels: Optional[Tensor] = None, ks: Sequence[int] = RECALL_KS,
                      backend: str = "torch") -> dict:
    """precision_at_1, r_precision, map_at_r and recall_at_k ({k: fraction of queries with a
    same-identity reference among their k nearest}). With R the number of references of the
    query's identity, R-precision = (same-identity among the R nearest) / R and
    MAP@R = (1/R) sum_{i <= R} precision@i * [i-th nearest is of the same identity]."""
    check_embeddings(query_emb, query_labels, name="query_emb")
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("give both ref_emb and ref_labels, or neither")
    self_search = ref_emb is None
    if self_search:
        ref_emb, ref_labels = query_emb, query_labels
    else:
        check_embeddings(ref_emb, ref_labels, name="ref_emb")
        if ref_emb.shape[1] != query_emb.shape[1]:
            raise ValueError(f"query_emb has D = {query_emb.shape[1]}, ref_emb {ref_emb.shape[1]}")
    same = query_labels[:, None] == ref_labels[None, :]  # (Q, R)
    r = same.sum(1) - int(self_search)  # (Q,) references of the query's identity
    keep = r > 0  # PML leaves out queries whose identity has no reference
    if not bool(keep.any()):
        nan = float("nan")
        return {"precision_at_1": nan, "r_precision": nan, "map_at_r": nan,
                "recall_at_k": {k: nan for k in ks}}
    k = max(int(r.max()), max(ks))
    _, idx = knn(query_emb.detach(), k, None if self_search else ref_emb.detach(), backend)
    hits = (ref_labels[idx] == query_labels[:, None])[keep].double()  # (Q', K)
    r = r[keep].double()  # (Q',)
    rank = torch.arange(1, hits.shape[1] + 1, device=hits.device, dtype=torch.float64)  # (K,)
    within_r = rank[None, :] <= r[:, None]  # (Q', K)
    precision_at_i = hits.cumsum(1) / rank  # (Q', K)
    return {
        "precision_at_1": hits[:, 0].mean().item(),
        "r_precision": ((hits * within_r).sum(1) / r).mean().item(),
        "map_at_r": ((precision_at_i * hits * within_r).sum(1) / r).mean().item(),
        "recall_at_k": {k: hits[:, :k].amax(1).mean().item() for k in ks},
    }


def kmeans(x: Tensor, k: int, n_init: int = 4, iters: int = 100, seed: int = 0) -> Tensor:
    """Lloyd's k-means with k-means++ seeding, the best of n_init runs by inertia.
    Returns (N,) cluster indices. Reproducible from seed (its own generator)."""
    x = x.detach().double().cpu()
    g = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        centres = x[torch.randint(len(x), (1,), generator=g)]  # (1, D)
        for _ in range(1, k):  # k-means++: the next centre with probability ~ d^2
            d2 = torch.cdist(x, centres).amin(1) ** 2  # (N,)
            p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / len(x))
            centres = torch.cat([centres, x[torch.multinomial(p, 1, generator=g)]])
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(1)  # (N,)
            new = torch.zeros_like(centres).index_add_(0, assign, x)
            sizes = torch.bincount(assign, minlength=k)[:, None]
            new = torch.where(sizes > 0, new / sizes.clamp(min=1), centres)  # keep empty clusters
            if torch.equal(new, centres):
                break
            centres = new
        assign = torch.cdist(x, centres).argmin(1)
        inertia = ((x - centres[assign]) ** 2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def _contingency(a: Tensor, b: Tensor) -> Tensor:
    """(A, B) counts of samples with label a_i in row i and b_j in column j (float64)."""
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    n_b = int(bi.max()) + 1 if len(bi) else 0
    counts = torch.bincount(ai * n_b + bi, minlength=(int(ai.max()) + 1 if len(ai) else 0) * n_b)
    return counts.view(-1, n_b).double()


def nmi(labels_true: Tensor, labels_pred: Tensor) -> float:
    """Normalised mutual information MI / ((H(true) + H(pred)) / 2), natural logarithms, with
    scikit-learn's conventions (1 when both labelings have one group, 0 when MI is 0)."""
    c = _contingency(labels_true, labels_pred)  # (A, B)
    if c.shape[0] == c.shape[1] <= 1:
        return 1.0
    n = c.sum()
    a, b = c.sum(1), c.sum(0)  # (A,), (B,)
    nz = c > 0
    mi = (c[nz] / n * (c[nz] * n / (a[:, None] * b[None, :])[nz]).log()).sum().clamp(min=0).item()
    if mi == 0:
        return 0.0
    h_a, h_b = -(a / n * (a / n).log()).sum(), -(b / n * (b / n).log()).sum()
    return mi / ((h_a + h_b) / 2).item()


def pairwise_f1(labels_true: Tensor, labels_pred: Tensor) -> float:
    """F1 over sample pairs: a pair is predicted same when it shares a cluster, truly same when it
    shares an identity; F1 = 2 TP / (2 TP + FP + FN) (1 when no pair is same in either)."""
    c = _contingency(labels_true, labels_pred)
    pairs = lambda t: (t * (t - 1) / 2).sum()  # noqa: E731  number of pairs inside groups
    tp, true_same, pred_same = pairs(c), pairs(c.sum(1)), pairs(c.sum(0))
    denominator = true_same + pred_same  # 2 TP + FP + FN
    return 1.0 if denominator == 0 else (2 * tp / denominator).item()


def clustering_metrics(emb: Tensor, labels: Tensor, seed: int = 0) -> dict:
    """k-means with k = number of identities; ``nmi`` and pairwise ``f1`` of the clusters."""
    check_embeddings(emb, labels)
    k = len(torch.unique(labels))
    if k == 0:
        return {"nmi": float("nan"), "f1": float("nan")}
    clusters = kmeans(emb, k, seed=seed)
    labels = labels.cpu()
    return {"nmi": nmi(labels, clusters), "f1": pairwise_f1(labels, clusters)}


def _best_threshold(dist: Tensor, same: Tensor) -> float:
    """The threshold t maximising the accuracy of "same iff dist <= t" on these pairs: the
    midpoint of the best gap between sorted distinct distances (the first best, below the
    smallest or above the largest distance where accepting none or all is best)."""
    d, order = dist.sort()
    s = same[order].double()
    # accept the first i pairs (i = 0..P): correct = same among them + different after them
    correct = torch.cat([s.new_zeros(1), s.cumsum(0)]) + (1 - s).sum() - torch.cat(
        [s.new_zeros(1), (1 - s).cumsum(0)])  # (P + 1,)
    cut_ok = torch.ones_like(correct, dtype=torch.bool)
    cut_ok[1:-1] = d[1:] > d[:-1]  # no cut between equal distances
    i = int(correct.masked_fill(~cut_ok, -1).argmax())
    if i == 0:
        return d[0].item() - 1.0
    if i == len(d):
        return d[-1].item() + 1.0
    return (d[i - 1].item() + d[i].item()) / 2


def verification_metrics(dist: Tensor, same: Tensor, folds: int = 10, seed: int = 0) -> dict:
    """dist (P,) pair distances, same (P,) bool. ``accuracy``: mean over ``folds`` folds (a
    seeded split) of the held-out accuracy of "same iff dist <= threshold", the threshold chosen
    on the other folds; ``threshold``: the mean chosen threshold; ``tar_at_far_1e-3``: the
    fraction of same pairs accepted at the largest threshold that accepts at most 0.1 % of the
    different pairs."""
    if dist.dim() != 1 or same.shape != dist.shape or same.dtype != torch.bool:
        raise ValueError(f"dist must be (P,) and same (P,) bool, got {tuple(dist.shape)} and "
                         f"{tuple(same.shape)} {same.dtype}")
    if not bool(torch.isfinite(dist).all()):
        raise ValueError("dist contains NaN or infinite values")
    dist, same = dist.detach().double().cpu(), same.cpu()
    nan = float("nan")
    if len(dist) < 2:
        return {"accuracy": nan, "threshold": nan, "tar_at_far_1e-3": nan}
    folds = min(folds, len(dist))
    order = torch.randperm(len(dist), generator=torch.Generator().manual_seed(seed))
    accuracies, thresholds = [], []
    for test in torch.tensor_split(order, folds):
        train = torch.ones(len(dist), dtype=torch.bool)
        train[test] = False
        t = _best_threshold(dist[train], same[train])
        accuracies.append(((dist[test] <= t) == same[test]).double().mean().item())
        thresholds.append(t)
    neg = dist[~same].sort().values
    allowed = math.floor(FAR * len(neg))  # false accepts allowed
    if not bool(same.any()):
        tar = nan
    elif allowed >= len(neg):
        tar = 1.0
    else:  # accept below the (allowed + 1)-th nearest different pair
        tar = (dist[same] < neg[allowed]).double().mean().item()
    return {"accuracy": sum(accuracies) / folds, "threshold": sum(thresholds) / folds,
            "tar_at_far_1e-3": tar}


def verification_pairs(emb: Tensor, labels: Tensor, max_pairs: int = 100_000, seed: int = 0
                       ) -> tuple[Tensor, Tensor]:
    """Balanced same / different pairs of a labelled set, as LFW's: up to max_pairs / 2 same pairs
    (i < j) and as many different ones, drawn with a seeded generator. Returns (dist (P,), same (P,))."""
    check_embeddings(emb, labels)
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    i, j = torch.triu_indices(len(labels), len(labels), 1)
    same = labels[i] == labels[j]
    n = min(int(same.sum()), int((~same).sum()), max_pairs // 2)
    pick = lambda m: m.nonzero().squeeze(1)[torch.randperm(int(m.sum()), generator=g)[:n]]  # noqa: E731
    chosen = torch.cat([pick(same), pick(~same)])
    x = emb.detach().cpu()
    return (x[i[chosen]] - x[j[chosen]]).norm(dim=1), same[chosen]
