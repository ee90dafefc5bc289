"""Symmetrical Synthesis: the reflection by hand, and every mining mode and the N-pair loss
against brute-force references written here with Python loops over pairs and triplets."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from gfl_det.metric import MINING, npair_loss, reflect, symmetrical_synthesis, triplet_loss
from gfl_det.metric import triplet as triplet_module
from gfl_det.metric.distance import normalize, pairwise_distance, same_identity
from gfl_det.metric.miners import batch_hard, facenet_triplets, sort_negatives
from gfl_det.metric.synthesis import nearest_candidates


def test_reflection_by_hand():
    # x_k = (1, 0) reflected about the axis of x_l = (1, 1): u_l = (1, 1)/sqrt2, x_k . u_l = 1/sqrt2,
    # x'_k = 2 (1/sqrt2) (1, 1)/sqrt2 - (1, 0) = (0, 1); x'_l = 2 (x_l . u_k) u_k - x_l = (2, 0) - (1, 1)
    x_k, x_l = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(reflect(x_k, x_l), torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(reflect(x_l, x_k), torch.tensor([[1.0, -1.0]]))
    # in 3-D: x = (3, 4, 0) about the axis (0, 0, 2): the component along z is 0 -> (-3, -4, 0)
    torch.testing.assert_close(reflect(torch.tensor([[3.0, 4.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.0]])),
                               torch.tensor([[-3.0, -4.0, 0.0]]))


def test_reflection_keeps_norms_and_pair_distance():
    g = torch.Generator().manual_seed(0)
    x_k, x_l = torch.randn(50, 7, generator=g, dtype=torch.float64), torch.randn(50, 7, generator=g, dtype=torch.float64)
    r_k, r_l = reflect(x_k, x_l), reflect(x_l, x_k)
    torch.testing.assert_close(r_k.norm(dim=1), x_k.norm(dim=1))
    torch.testing.assert_close((r_k - x_l).norm(dim=1), (x_k - x_l).norm(dim=1))
    torch.testing.assert_close((x_k - r_l).norm(dim=1), (x_k - x_l).norm(dim=1))
    assert (r_k - x_k).norm(dim=1).min() > 1e-3  # a new point, not the old one


def test_pairs_cover_every_same_identity_pair_and_single_members():
    labels = torch.tensor([0, 1, 0, 2, 0, 1])
    pairs = symmetrical_synthesis(torch.randn(6, 3), labels)
    assert sorted(zip(pairs.k.tolist(), pairs.l.tolist())) == [(0, 2), (0, 4), (1, 5), (2, 4), (3, 3)]
    # the single member (3, 3) reflects onto itself
    i = pairs.k.tolist().index(3)
    torch.testing.assert_close(pairs.reflected_k[i], pairs.reflected_l[i])


def _units(x, labels):
    """Brute force: the negative units (label, [candidate points]) of Symmetrical Synthesis."""
    units, n = [], len(x)
    for k in range(n):
        partners = [l for l in range(n) if l != k and labels[l] == labels[k]]
        if not partners:
            units.append((int(labels[k]), [x[k]]))
        for l in partners:
            if l > k:
                u_k, u_l = x[k] / x[k].norm(), x[l] / x[l].norm()
                r_k = 2 * torch.dot(x[k], u_l) * u_l - x[k]
                r_l = 2 * torch.dot(x[l], u_k) * u_k - x[l]
                units.append((int(labels[k]), [x[k], x[l], r_k, r_l]))
    return units


def _brute_triplet(emb, labels, margin, mining, synthesis):
    """Every triplet spelled out (anchor, positive sample, negative unit)."""
    x = F.normalize(emb, dim=1)
    if synthesis:
        units = _units(x, labels)
    else:
        units = [(int(labels[i]), [x[i]]) for i in range(len(x))]
    losses = []
    for a in range(len(x)):
        ps = [p for p in range(len(x)) if p != a and labels[p] == labels[a]]
        d_n = [min((x[a] - c).norm() for c in cands) for lab, cands in units if lab != int(labels[a])]
        if not ps or not d_n:
            continue
        d_n = torch.stack(d_n)
        d_ps = torch.stack([(x[a] - x[p]).norm() for p in ps])
        if mining == "batch-hard":
            losses.append(F.relu(d_ps.max() - d_n.min() + margin))
            continue
        for d_p in d_ps:
            if mining == "facenet":
                above = d_n[d_n > d_p]
                d_chosen = above.min() if len(above) else d_n.max()
                losses.append(F.relu(d_p - d_chosen + margin))
                continue
            for d in d_n:
                t = d - d_p
                keep = {"all": t <= margin, "semihard": (t > 0) & (t <= margin), "hard": t <= 0}[mining]
                if keep:
                    losses.append(F.relu(d_p - d + margin))
    if not losses:
        return torch.zeros((), dtype=emb.dtype)
    losses = torch.stack(losses)
    if mining == "facenet":
        return losses.mean()
    nonzero = losses[losses > 0]
    return nonzero.mean() if len(nonzero) else torch.zeros((), dtype=emb.dtype)


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("synthesis", [None, "symmetrical"])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_against_brute_force(mining, synthesis, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 1])  # identity 3 has one member
    emb = torch.randn(len(labels), 3, generator=g, dtype=torch.float64)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    ours = triplet_loss(e1, labels, 0.3, mining, synthesis)
    ref = _brute_triplet(e2, labels, 0.3, mining, synthesis)
    assert ref.item() > 0
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(e1.grad, e2.grad)


def test_synthesis_changes_the_negatives_only():
    """The positive distances the miners see are the same with and without synthesis; the negatives
    are at most as far (the originals are among the candidates) and some strictly nearer."""
    g = torch.Generator().manual_seed(4)
    labels = torch.arange(8).repeat_interleave(4)
    x = normalize(torch.randn(32, 5, generator=g, dtype=torch.float64))
    d = pairwise_distance(x)
    pos, neg = same_identity(labels)
    pairs = symmetrical_synthesis(x, labels)
    d_pairs, _ = nearest_candidates(x, d, pairs)  # (N, U)
    neg_pairs = labels[:, None] != labels[pairs.k][None, :]
    a0, p0, n0 = batch_hard(d, pos, d, neg)
    a1, p1, n1 = batch_hard(d, pos, d_pairs, neg_pairs)
    assert torch.equal(a0, a1) and torch.equal(p0, p1)  # same anchors, same hardest positives
    plain, synthetic = d[a0, n0], d_pairs[a1, n1]
    assert bool((synthetic <= plain + 1e-12).all()) and bool((synthetic < plain - 1e-3).any())
    a0, p0, _ = facenet_triplets(d, pos, sort_negatives(d, neg))
    a1, p1, _ = facenet_triplets(d, pos, sort_negatives(d_pairs, neg_pairs))
    assert torch.equal(a0, a1) and torch.equal(p0, p1)  # every positive pair kept, unchanged


def test_chunked_synthesis_equals_one_chunk(monkeypatch):
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(6).repeat_interleave(5)
    emb = torch.randn(30, 6, generator=g, dtype=torch.float64)
    for mining in MINING:
        e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
        whole = triplet_loss(e1, labels, 0.2, mining, "symmetrical")
        with monkeypatch.context() as m:
            m.setattr(triplet_module, "CHUNK_ELEMENTS", 4 * 60 * 7)  # 7 anchors per chunk
            chunked = triplet_loss(e2, labels, 0.2, mining, "symmetrical")
        whole.backward()
        chunked.backward()
        assert chunked.item() == pytest.approx(whole.item(), rel=1e-12), mining
        torch.testing.assert_close(e1.grad, e2.grad)


def _brute_symm_npair(anchor, positive, labels, scale):
    """Authors' code (itertools.combinations of anchor, pos, sym1, sym2) for pairs of different
    identities; the plain similarity for pairs of one identity; TensorFlow's soft targets."""
    a, p = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
    m = len(a)
    rows = []
    for i in range(m):
        row = []
        for j in range(m):
            if labels[i] == labels[j]:
                row.append(torch.dot(a[i], p[j]))
                continue
            pts = lambda t: [a[t], p[t], reflect(p[t:t + 1], a[t:t + 1])[0], reflect(a[t:t + 1], p[t:t + 1])[0]]  # noqa
            pi, pj = pts(i), pts(j)
            row.append(max(torch.dot(pi[u], pj[v]) for u, v in itertools.combinations(range(4), 2)))
        rows.append(torch.stack(row))
    sim = torch.stack(rows)
    targets = (labels[:, None] == labels[None, :]).double()
    targets = targets / targets.sum(1, keepdim=True)
    return -(targets * torch.log_softmax(scale * sim, dim=1)).sum(1).mean()


@pytest.mark.parametrize("synthesis", [None, "symmetrical"])
def test_npair_against_brute_force(synthesis):
    g = torch.Generator().manual_seed(6)
    labels = torch.tensor([0, 1, 2, 3, 1, 4])  # identity 1 has two pairs: soft targets
    anchor = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    positive = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ours = npair_loss(anchor, positive, labels, scale=4.0, synthesis=synthesis)
    if synthesis:
        ref = _brute_symm_npair(anchor, positive, labels, 4.0)
        assert ours.item() > npair_loss(anchor, positive, labels, scale=4.0).item()  # harder negatives
    else:
        a, p = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
        same = (labels[:, None] == labels[None, :]).double()
        ref = -(same / same.sum(1, keepdim=True) * torch.log_softmax(4.0 * a @ p.T, 1)).sum(1).mean()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    grads = torch.autograd.grad(ours, [anchor, positive])
    ref_grads = torch.autograd.grad(ref, [anchor, positive])
    for g1, g2 in zip(grads, ref_grads):
        torch.testing.assert_close(g1, g2)


def test_symm_npair_positives_unchanged():
    """Under synthesis only the off-identity logits change: with one pair the loss is log(1) = 0
    either way, and the positive logit of every row is the plain a_i . p_i."""
    a, p = torch.randn(1, 3), torch.randn(1, 3)
    assert npair_loss(a, p, torch.tensor([0]), synthesis="symmetrical").item() == pytest.approx(0.0, abs=1e-7)
    # two pairs of one identity: every entry is a positive, synthesis changes nothing
    a, p, same = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([7, 7])
    assert npair_loss(a, p, same, 3.0, "symmetrical").item() == npair_loss(a, p, same, 3.0).item()
