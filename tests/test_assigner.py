"""Batched ATSS against a plain per-image reference (MMDetection's algorithm, written out)."""
import pytest
import torch

from gfl_det.assigner import atss_assign
from gfl_det.boxes import aligned_iou
from gfl_det.priors import make_priors

STRIDES = [8, 16, 32, 64, 128]


def reference_atss(anchors, level_counts, gt, topk=9):
    """One image, valid anchors only (N, 4) split by level; returns (N,) gt index or -1.

    Straight from the paper / mmdet: per level the topk nearest anchor centres (ties to the lower
    index, via a stable sort), threshold mean + unbiased std, centre strictly inside by > 0.01,
    conflicts to the largest IoU (lowest gt index on ties).
    """
    N, G = anchors.shape[0], gt.shape[0]
    out = torch.full((N,), -1, dtype=torch.long)
    if G == 0 or N == 0:
        return out
    ious = aligned_iou(anchors[:, None], gt[None])  # (N, G), broadcast: every anchor with every gt
    acx = (anchors[:, 0] + anchors[:, 2]) / 2.0
    acy = (anchors[:, 1] + anchors[:, 3]) / 2.0
    gcx = (gt[:, 0] + gt[:, 2]) / 2.0
    gcy = (gt[:, 1] + gt[:, 3]) / 2.0
    dist = ((acx[:, None] - gcx[None]) ** 2 + (acy[:, None] - gcy[None]) ** 2).sqrt()
    best = torch.full((N,), -float("inf"))
    for g in range(G):
        cands, start = [], 0
        for n in level_counts:
            order = torch.sort(dist[start:start + n, g], stable=True).indices[:min(topk, n)]
            cands.append(order + start)
            start += n
        c = torch.cat(cands)
        ci = ious[c, g]
        thr = ci.mean() + ci.std()
        for a in c.tolist():
            inside = min(acx[a] - gt[g, 0], acy[a] - gt[g, 1], gt[g, 2] - acx[a], gt[g, 3] - acy[a]) > 0.01
            if ious[a, g] >= thr and inside and ious[a, g] > best[a]:
                best[a] = ious[a, g]
                out[a] = g
    return out


def random_boxes(g, n, h, w, tiny=False):
    if n == 0:
        return torch.zeros(0, 4)
    lo = 1.0 if tiny else 2.0
    bw = torch.exp(torch.empty(n).uniform_(0, 1, generator=g) * (torch.log(torch.tensor(0.9 * w)) - torch.log(torch.tensor(lo))) + torch.log(torch.tensor(lo)))
    bh = torch.exp(torch.empty(n).uniform_(0, 1, generator=g) * (torch.log(torch.tensor(0.9 * h)) - torch.log(torch.tensor(lo))) + torch.log(torch.tensor(lo)))
    x1 = torch.rand(n, generator=g) * (w - bw)
    y1 = torch.rand(n, generator=g) * (h - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], 1)


def run_case(img_shapes, boxes_list, topk=9):
    pad = torch.tensor([[-(-h // 32) * 32, -(-w // 32) * 32] for h, w in img_shapes])
    Hb, Wb = pad.max(0).values.tolist()
    sizes = [(-(-Hb // s), -(-Wb // s)) for s in STRIDES]
    pri = make_priors(sizes, STRIDES)
    B, G = len(boxes_list), max([len(b) for b in boxes_list] + [1])
    gb = torch.zeros(B, G, 4)
    gv = torch.zeros(B, G, dtype=torch.bool)
    for i, b in enumerate(boxes_list):
        gb[i, :len(b)], gv[i, :len(b)] = b, True
    asg = atss_assign(pri, gb, gv, pad, topk=topk)
    valid = pri.valid_mask(pad)
    boxes = pri.boxes(8.0)
    for i in range(B):
        vi = valid[i]
        counts = [int(v.sum()) for v in vi.split(pri.num_level)]
        ref = reference_atss(boxes[vi], counts, boxes_list[i], topk)
        assert torch.equal(asg.assigned[i][vi], ref), f"image {i}"
        assert (asg.assigned[i][~vi] == -1).all()
        assert asg.num_pos[i] == (ref >= 0).sum()
        # every positive prior is exactly one winning slot of its gt
        slots = asg.cand_idx[i][asg.pos[i]]
        assert slots.numel() == len(set(slots.tolist())) == int((ref >= 0).sum())
    return asg


@pytest.mark.parametrize("seed", range(4))
def test_batched_matches_reference_random(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 410), (256, 180), (97, 333)]
    counts = [100, 1, 0]
    boxes = [random_boxes(g, n, h, w) for n, (h, w) in zip(counts, shapes)]
    asg = run_case(shapes, boxes)
    assert asg.num_pos[2] == 0 and asg.num_pos[0] > 0


def test_boxes_smaller_than_stride_and_near_padding():
    g = torch.Generator().manual_seed(7)
    h, w = 200, 250  # pad 224 x 256, batch padded to 320 x 256 by the second image
    tiny = random_boxes(g, 20, h, w, tiny=True).clamp(max=7.0) + torch.tensor([3.0, 3.0, 3.0, 3.0])
    edge = torch.tensor([[240.0, 190.0, 249.9, 199.9], [0.0, 0.0, 2.0, 2.0], [200.0, 150.0, 250.0, 200.0]])
    other = random_boxes(g, 5, 310, 90)
    run_case([(h, w), (310, 90)], [torch.cat([tiny, edge]), other])


def test_ties_go_to_lower_index_consistently():
    # gt centres exactly between prior points (x = 12 is midway between 8 and 16 at stride 8),
    # and duplicate gt boxes (identical IoUs: the lower gt index wins)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [4.0, 4.0, 20.0, 20.0], [40.0, 8.0, 104.0, 72.0],
                          [0.0, 0.0, 64.0, 64.0], [96.0, 96.0, 160.0, 160.0]])
    asg = run_case([(192, 192)], [boxes])
    assert (asg.assigned[0] == 1).sum() == 0  # the duplicate never wins
    assert (asg.assigned[0] == 0).sum() > 0


def test_empty_batch_and_topk_larger_than_level():
    run_case([(64, 64), (40, 40)], [torch.zeros(0, 4), torch.zeros(0, 4)])
    # tiny images: the coarse levels have fewer than topk valid priors
    g = torch.Generator().manual_seed(3)
    run_case([(40, 70), (64, 32)], [random_boxes(g, 3, 40, 70), random_boxes(g, 4, 64, 32)])
