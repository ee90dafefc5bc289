"""The embedding loss: an extra term of :class:`gfl_det.criterion.GFLCriterion` that teaches the
embedding branch (``gfl_det/models/embed_head.py``) which object each detection is.

Legend: B images, G gt boxes per image (padded), A priors, P positives, N selected rows,
D embedding dimension, W processes.

    PriorTargets.pos / .assigned (B, A), Positives.quality (B, A)      from the criterion
      1. per gt its ``max_per_gt`` best positives by IoU quality       (b, a) rows, N of them
      2. identity = Targets.ids gathered through the assignment          ids (N,), -1 unknown dropped
      3. their embeddings, computed at the N rows only (EmbedHead.rows)   emb (N, D)
      4. all processes' rows gathered (the local ones keep their gradient)
      5. ONE metric loss over the whole batch (gfl_det.metric), so identities match across images

    loss_embed = loss_weight * metric_loss(emb, ids)

``loss=dict(type=...)`` selects the metric loss of :mod:`gfl_det.metric` with its options:

    'triplet'      mining ('all' / 'semihard' / 'hard' / 'batch-hard' / 'facenet'), margin,
                   synthesis (None / 'symmetrical'), squared        FaceNet's triplet loss
    'contrastive'  pos_margin, neg_margin                            Hadsell et al.
    'npair'        scale, synthesis; one (anchor, positive) pair per identity (its first two rows)
    'arcface'      num_ids (required: the training identities, ids in [0, num_ids)), scale, margin;
                   the (num_ids, D) class centres are parameters of this term, so they train and are
                   saved with the model (``criterion.extra_terms.embed.arcface.weight``)
    'siamese'      neg_per_pos; the verification head w . |f1 - f2| + b lives here too

Also returned (logged, not summed: no 'loss' in the name): ``embed_active_triplets``, the fraction
of the batch's triplets (a, p, n) that violate the margin, d(a, p) - d(a, n) + m > 0 (m = the
triplet margin, 0.2 for the other losses) -- FaceNet's measure of how much is left to learn.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .config_check import check_keys
from .metric import (ArcFaceLoss, SiameseBinaryHead, contrastive_loss, npair_loss, siamese_binary_loss,
                     triplet_loss)
from .metric.distance import normalize, pairwise_distance, same_identity
from .metric.miners import margin_triplets
from .metric.triplet import MINING

__all__ = ['EmbeddingLoss', 'LOSS_TYPES', 'select_best_positives', 'gather_across_processes']

LOSS_TYPES = ('triplet', 'contrastive', 'npair', 'arcface', 'siamese')
_OPTIONS = {  # per type: option -> allowed values (None: any)
    'triplet': dict(mining=MINING, margin=None, synthesis=(None, 'symmetrical'), squared=(True, False)),
    'contrastive': dict(pos_margin=None, neg_margin=None),
    'npair': dict(scale=None, synthesis=(None, 'symmetrical')),
    'arcface': dict(num_ids=None, scale=None, margin=None),
    'siamese': dict(neg_per_pos=None),
}
ACTIVE_MARGIN = 0.2  # the margin of embed_active_triplets for losses without one


def select_best_positives(pos: Tensor, assigned: Tensor, quality: Tensor, k: int,
                          num_gt: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Per gt box its ``k`` positives of highest ``quality`` (ties: the lower prior index first).

    pos (B, A) bool, assigned (B, A) gt index (-1 negative), quality (B, A); ``num_gt``: G, the
    gt slots per image (read from ``assigned`` when not given: a host read). Returns the rows
    (b (N,), a (N,)) grouped by (image, gt), best first. No loop: the positives are compacted
    once, sorted by quality and then (stably) by their gt, and each keeps its rank in its group."""
    b, a = pos.nonzero(as_tuple=True)  # (P,) in (b, a) order
    if num_gt is None:
        num_gt = int(assigned.max()) + 1 if assigned.numel() else 1
    group = b * max(num_gt, 1) + assigned[b, a]  # (P,) one per gt
    order = quality[b, a].sort(descending=True, stable=True).indices  # best first, ties by (b, a)
    order = order[group[order].sort(stable=True).indices]  # grouped by gt, best first inside
    g = group[order]
    rank = torch.arange(len(g), device=g.device) - torch.searchsorted(g, g)  # place in its group
    keep = order[rank < k]
    return b[keep], a[keep]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def gather_across_processes(emb: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """All processes' rows, in rank order: (sum_r N_r, D) and (sum_r N_r,); as given in a
    single process.

    The loss is then computed over the union on every process, the same value everywhere. Only
    the local rows keep a gradient, scaled by W: DDP averages the parameter gradients over the
    W processes, so the average, sum_r dL/d emb_r * d emb_r / d theta, is exactly the gradient of
    the single-process loss over the union (tests/test_embed_dist.py checks it with 2 processes).
    Parameters the loss owns (ArcFace centres) get dL/dW on every process: their average is too."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return emb, ids
    world, rank = dist.get_world_size(), dist.get_rank()
    counts = [torch.zeros(1, dtype=torch.long, device=emb.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(emb)], device=emb.device))
    counts = [int(c) for c in counts]
    most = max(counts)
    pad_emb = emb.new_zeros(most, emb.shape[1])
    pad_emb[:len(emb)] = emb.detach()
    pad_ids = ids.new_full((most,), -1)
    pad_ids[:len(ids)] = ids
    all_emb = [torch.empty_like(pad_emb) for _ in range(world)]
    all_ids = [torch.empty_like(pad_ids) for _ in range(world)]
    dist.all_gather(all_emb, pad_emb)
    dist.all_gather(all_ids, pad_ids)
    rows = [e[:n] for e, n in zip(all_emb, counts)]
    rows[rank] = _ScaleGrad.apply(emb, float(world))
    return torch.cat(rows), torch.cat([i[:n] for i, n in zip(all_ids, counts)])


class EmbeddingLoss(nn.Module):
    """The criterion's ``'embed'`` term (see the module doc).

    Args:
        dim: D.
        loss: ``dict(type=<one of LOSS_TYPES>, **options)`` (default a FaceNet triplet loss).
        loss_weight: multiplies the metric loss.
        max_per_gt: how many positives of each gt (its best by IoU quality) enter the loss.
        rows: ``(HeadOutputs.embed, b, a) -> (N, D)`` unit embeddings of the rows (b_i, a_i)
            (``EmbedHead.rows``; its weights belong to the head, so it is a plain attribute here,
            not a submodule).
    """

    def __init__(self, dim: int, loss: Optional[dict] = None, loss_weight: float = 1.0, max_per_gt: int = 4,
                 rows: Optional[Callable[[list, Tensor, Tensor], Tensor]] = None):
        super().__init__()
        self.rows = rows
        cfg = dict(loss or dict(type='triplet', mining='facenet', margin=0.2))
        kind = cfg.pop('type', 'triplet')
        if kind not in LOSS_TYPES:
            raise ValueError(f"bbox_head.embed.loss: type {kind!r} is not implemented by gfl_det; "
                             f"supported: {', '.join(repr(t) for t in LOSS_TYPES)}")
        self.kind, self.options = kind, check_keys(f'bbox_head.embed.loss ({kind})', cfg, **_OPTIONS[kind])
        self.loss_weight, self.max_per_gt = float(loss_weight), int(max_per_gt)
        if self.loss_weight < 0 or self.max_per_gt < 1:
            raise ValueError(f'bbox_head.embed: loss_weight ({loss_weight}) must be >= 0 and '
                             f'max_per_gt ({max_per_gt}) >= 1')
        if kind == 'arcface':
            if 'num_ids' not in cfg:
                raise ValueError("bbox_head.embed.loss: type 'arcface' needs num_ids, the number of "
                                 'training identities (ids are 0..num_ids-1)')
            self.arcface = ArcFaceLoss(int(cfg['num_ids']), dim, scale=float(cfg.get('scale', 64.0)),
                                       margin=float(cfg.get('margin', 0.5)))
        if kind == 'siamese':
            self.siamese = SiameseBinaryHead(dim)

    def forward(self, outputs, targets, prior_targets, positives) -> dict[str, Tensor]:
        if outputs.embed is None or self.rows is None:
            raise ValueError('the embedding loss needs the head\'s embedding tower: HeadOutputs.embed is None '
                             'or the term was built without the tower (use build_embedding)')
        if targets.ids is None:
            raise ValueError('bbox_head.embed is configured but the batch has no identities (Targets.ids): '
                             "give the annotations an 'instance_id' (CocoDataset(identities='instance_id')) "
                             "or train on two views of each image (MultiViewDataset, views=2)")
        t = prior_targets
        b, a = select_best_positives(t.pos, t.assigned, positives.quality, self.max_per_gt,
                                     num_gt=targets.ids.shape[1])  # (N,)
        ids = targets.ids[b, t.assigned[b, a]]  # (N,) the gt's identity
        known = (ids >= 0).nonzero().squeeze(1)
        emb = self.rows(outputs.embed, b[known], a[known])  # (N, D)
        emb, ids = gather_across_processes(emb, ids[known])
        if not bool(torch.isfinite(emb).all()):  # a diverged step: NaN for the non-finite guard
            return {'loss_embed': emb.sum() * float('nan'), 'embed_active_triplets': emb.new_tensor(float('nan'))}
        return {'loss_embed': self.loss_weight * self.metric_loss(emb, ids),
                'embed_active_triplets': self.active_fraction(emb, ids)}

    def metric_loss(self, emb: Tensor, ids: Tensor) -> Tensor:
        """The configured loss of :mod:`gfl_det.metric` over rows emb (N, D), ids (N,)."""
        o = self.options
        if self.kind == 'triplet':
            return triplet_loss(emb, ids, margin=o.get('margin', 0.2), mining=o.get('mining', 'facenet'),
                                synthesis=o.get('synthesis'), squared=o.get('squared', False))
        if self.kind == 'contrastive':
            return contrastive_loss(emb, ids, pos_margin=o.get('pos_margin', 0.0), neg_margin=o.get('neg_margin', 1.0))
        if self.kind == 'npair':
            s = ids.sort(stable=True)
            second = (torch.arange(len(ids), device=ids.device) - torch.searchsorted(s.values, s.values) == 1)
            j = second.nonzero().squeeze(1)  # each identity's second row; its first is just before
            anchor, positive = s.indices[j - 1], s.indices[j]
            return npair_loss(emb[anchor], emb[positive], ids[anchor], scale=o.get('scale', 1.0),
                              synthesis=o.get('synthesis'))
        if self.kind == 'arcface':
            return self.arcface(emb, ids)
        return siamese_binary_loss(emb, ids, self.siamese, neg_per_pos=o.get('neg_per_pos', 1.0))

    @torch.no_grad()
    def active_fraction(self, emb: Tensor, ids: Tensor) -> Tensor:
        """Fraction of all triplets (a, p, n) of the rows with d(a, p) - d(a, n) + m > 0."""
        m = self.options.get('margin', ACTIVE_MARGIN) if self.kind == 'triplet' else ACTIVE_MARGIN
        squared = self.options.get('squared', False) if self.kind == 'triplet' else False
        d = pairwise_distance(normalize(emb), squared=squared)  # (N, N)
        pos, neg = same_identity(ids)
        _, active = margin_triplets(d, pos, d, neg, m, 'all')  # 'all' keeps exactly the violating ones
        total = (pos.sum(1) * neg.sum(1)).sum()
        return active.double().div(total.clamp(min=1)).float()
