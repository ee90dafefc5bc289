"""The GFL training criterion: assignment, targets, loss terms and normalisers, in one place.

Legend: B images, G gt boxes per image (padded), A priors over all levels, C classes,
R = reg_max (each box edge is a distribution over the bins 0..R).

    HeadOutputs + Targets
      1. priors from the maps' shapes; valid priors: inside each image's own padded area
      2. ATSS assignment, batched, no gradient                        assigned (B, A)
      3. per-prior targets: ONE gather of every prior's gt            PriorTargets
      4. the positives' decoded boxes, IoU quality and box weights     Positives
      5. loss terms, each a plain sum over the batch:
           loss_cls   QFL over every valid (prior, class)             (losses.py, eq. 5)
           loss_bbox  GIoU loss of the positives, weighted by w
           loss_dfl   DFL of the positives' four edges, weighted by w (losses.py, eq. 6)
           + extra terms (e.g. the embedding loss), given the same targets and positives
      6. normalisers (all-reduced across processes, as MMDetection) -> loss_weight x sum / norm

Everything is dense over (B, A) with a foreground mask (as torchvision's FCOS): no ``nonzero``,
no per-image or per-box loop, so no host synchronisation on a GPU and static shapes for
``torch.compile``. Mixed precision: the head outputs may be bf16/fp16 (autocast); everything
here runs in float32 with autocast off.

Config: built from MMDetection's keys (``loss_cls=dict(type='QualityFocalLoss', beta=2.0,
loss_weight=1.0)``, ``assigner=dict(type='ATSSAssigner', topk=9)``, ...). A ``type`` or an
option gfl_det does not implement is refused with an error naming the key and what is
supported -- a config never silently trains something else than it says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .assigner import atss_assign
from .boxes import aligned_iou, bbox2distance, distance2bbox
from .config_check import check_keys, pop_type
from .host import host_tensor
from .losses import distribution_focal_loss, giou_loss, quality_focal_loss
from .postprocess import flatten_reg, integral
from .priors import Priors, make_priors
from .structures import HeadOutputs, Targets

__all__ = ['GFLCriterion', 'PriorTargets', 'Positives', 'reduce_mean']

EPS32 = float(torch.finfo(torch.float32).eps)  # mmdet's weight_reduce_loss adds this to avg_factor


@dataclass
class PriorTargets:
    """Step 3: every prior's target, dense over the batch (no gradient)."""

    priors: Priors
    valid: Tensor  # (B, A) bool: inside the image's padded area (mmdet's label weight)
    assigned: Tensor  # (B, A) int64: index of the assigned gt, -1 for negatives
    pos: Tensor  # (B, A) bool: positive (assigned and valid)
    labels: Tensor  # (B, A) int64: the gt's class at positives, C (background) elsewhere
    boxes: Tensor  # (B, A, 4) float32: the gt box (input px) at positives, 0 elsewhere
    num_pos: Tensor  # (B,) int64


@dataclass
class Positives:
    """Step 4: what the box terms and the QFL target need from the predictions, dense (B, A),
    meaningful where ``PriorTargets.pos`` (elsewhere finite stand-ins that get weight 0)."""

    reg: Tensor  # (B, A, 4, R + 1) float32 edge-distribution logits
    pred_boxes: Tensor  # (B, A, 4) decoded prediction, in units of the prior's stride
    target_boxes: Tensor  # (B, A, 4) gt box in units of the prior's stride
    centres: Tensor  # (A, 2) prior points in units of their stride
    quality: Tensor  # (B, A) IoU(pred, gt) (detached): QFL's soft target; 0 at negatives
    weight: Tensor  # (B, A) the box terms' weight: the prior's best class score (detached), 0 at negatives


def reduce_mean(x: Tensor) -> Tensor:
    """Mean over the processes of a distributed run (MMDetection's ``reduce_mean``); ``x`` as it
    is in a single process. No host synchronisation (stays a tensor)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.detach().clone()
        dist.all_reduce(x.div_(dist.get_world_size()))
    return x


def class_logits(outputs: HeadOutputs) -> Tensor:
    """(B, C, A): the levels' class maps side by side, one concatenation of views (QFL is a sum
    over every (prior, class): no need for the (B, A, C) order, nor for its copy)."""
    return torch.cat([c.flatten(2) for c in outputs.cls], 2)


# An extra loss term: (outputs, targets, prior targets, positives) -> {name: loss}. It owns its
# own normalisation; nn.Module terms are submodules of the criterion (their parameters train
# and are saved with the model).
ExtraTerm = Callable[[HeadOutputs, Targets, PriorTargets, Positives], Mapping[str, Tensor]]


class GFLCriterion(nn.Module):
    """QFL + GIoU + DFL with ATSS assignment, normalised as MMDetection's ``GFLHead``.

    Args (MMDetection's ``bbox_head`` / ``train_cfg`` keys):
        num_classes: C.
        reg_max: R, the last distribution bin.
        strides: the levels' strides.
        octave_base_scale: ATSS anchor side = octave_base_scale x stride.
        loss_cls: ``dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0)``.
        loss_bbox: ``dict(type='GIoULoss', loss_weight=2.0)``.
        loss_dfl: ``dict(type='DistributionFocalLoss', loss_weight=0.25)``.
        assigner: ``dict(type='ATSSAssigner', topk=9)``.
        bbox_coder: ``dict(type='DistancePointBBoxCoder')``.
        sampler: ``None`` or ``dict(type='PseudoSampler')`` (GFL samples nothing).
        extra_terms: ``{name: term}`` more loss terms (see :data:`ExtraTerm`).
        fused_qfl: compute loss_cls with :func:`gfl_det.fast.qfl.fused_qfl_sum` (the same sum and
            gradient in one pass, beta 2 only) instead of :func:`quality_focal_loss`.
        compile_loss: run :meth:`gfl_losses` through ``torch.compile``, one compilation for
            every image shape (:mod:`gfl_det.fast.compile_loss`).
    """

    def __init__(self, num_classes: int, reg_max: int = 16, strides: Sequence[int] = (8, 16, 32, 64, 128),
                 octave_base_scale: float = 8.0, loss_cls: Optional[dict] = None,
                 loss_bbox: Optional[dict] = None, loss_dfl: Optional[dict] = None,
                 assigner: Optional[dict] = None, bbox_coder: Optional[dict] = None,
                 sampler: Optional[dict] = None, allowed_border: int = -1, pos_weight: float = -1,
                 debug: bool = False, extra_terms: Optional[Mapping[str, ExtraTerm]] = None,
                 fused_qfl: bool = False, compile_loss: bool = False):
        super().__init__()
        self.num_classes, self.reg_max = int(num_classes), int(reg_max)
        self.strides, self.octave_base_scale = tuple(strides), float(octave_base_scale)
        qfl = pop_type('loss_cls', loss_cls, 'QualityFocalLoss')
        check_keys('loss_cls', qfl, use_sigmoid=(True,), activated=(False,), reduction=('mean',),
                   beta=None, loss_weight=None)
        giou = pop_type('loss_bbox', loss_bbox, 'GIoULoss')
        check_keys('loss_bbox', giou, reduction=('mean',), eps=None, loss_weight=None)
        dfl = pop_type('loss_dfl', loss_dfl, 'DistributionFocalLoss')
        check_keys('loss_dfl', dfl, reduction=('mean',), loss_weight=None)
        atss = pop_type('train_cfg.assigner', assigner, 'ATSSAssigner')
        check_keys('train_cfg.assigner', atss, topk=None, alpha=(None,), ignore_iof_thr=(-1,),
                   iou_calculator=(dict(type='BboxOverlaps2D'),))
        check_keys('bbox_head.bbox_coder', pop_type('bbox_head.bbox_coder', bbox_coder, 'DistancePointBBoxCoder'),
                   clip_border=(True,))
        if sampler is not None:
            check_keys('train_cfg.sampler', pop_type('train_cfg.sampler', sampler, 'PseudoSampler'))
        check_keys('train_cfg', dict(allowed_border=allowed_border, pos_weight=pos_weight, debug=debug),
                   allowed_border=(-1,), pos_weight=(-1,), debug=(False,))
        self.beta = float(qfl.get('beta', 2.0))
        self.giou_eps = float(giou.get('eps', 1e-6))
        self.topk = int(atss.get('topk', 9))
        self.loss_weights = {'loss_cls': float(qfl.get('loss_weight', 1.0)),
                             'loss_bbox': float(giou.get('loss_weight', 2.0)),
                             'loss_dfl': float(dfl.get('loss_weight', 0.25))}
        if fused_qfl and self.beta != 2.0:
            raise ValueError(f'fused_qfl implements QFL with beta 2 only; loss_cls.beta is {self.beta}')
        self.fused_qfl = bool(fused_qfl)
        self.compile_loss = bool(compile_loss)  # gfl_det/fast/compile_loss.py
        self.compile_backend = 'inductor'
        self.extra_terms = nn.ModuleDict({k: v for k, v in (extra_terms or {}).items()
                                          if isinstance(v, nn.Module)})
        self._plain_terms = {k: v for k, v in (extra_terms or {}).items() if not isinstance(v, nn.Module)}

    # ------------------------------------------------------------------ the steps
    def forward(self, outputs: HeadOutputs, targets: Targets, metas: Sequence[dict]) -> dict[str, Tensor]:
        """All loss terms of a batch, weighted and normalised."""
        with torch.autocast(device_type=outputs.cls[0].device.type, enabled=False):
            if self.compile_loss:
                from .fast.compile_loss import compiled_gfl_losses
                losses, t, p = compiled_gfl_losses(type(self).gfl_losses, self.compile_backend)(
                    self, outputs, targets, metas)
            else:
                losses, t, p = self.gfl_losses(outputs, targets, metas)
            for name, term in self.terms():
                for k, v in term(outputs, targets, t, p).items():
                    if k in losses:
                        raise KeyError(f'extra loss term {name!r} returned {k!r}, which exists already')
                    losses[k] = v
        return losses

    def gfl_losses(self, outputs: HeadOutputs, targets: Targets,
                   metas: Sequence[dict]) -> tuple[dict[str, Tensor], PriorTargets, Positives]:
        """Steps 1-6: the GFL terms (weighted and normalised), and the prior targets and
        positives the extra terms are given. What ``fast.compile_loss`` compiles."""
        t = self.prior_targets(outputs, targets, metas)
        p = self.positives(outputs, t)
        sums = self.loss_sums(outputs, t, p)
        norms = self.normalisers(t, p)
        return {k: self.loss_weights[k] * sums[k] / norms[k] for k in sums}, t, p

    def terms(self) -> list[tuple[str, ExtraTerm]]:
        return list(self.extra_terms.items()) + list(self._plain_terms.items())

    @torch.no_grad()
    def prior_targets(self, outputs: HeadOutputs, targets: Targets, metas: Sequence[dict]) -> PriorTargets:
        """Steps 1-3: priors, ATSS, and every prior's gt gathered once."""
        dev = outputs.cls[0].device
        if targets.valid.shape[1] == 0:  # no box in the batch: one padding entry to gather from
            B = targets.valid.shape[0]
            targets = Targets(targets.boxes.new_zeros(B, 1, 4), targets.labels.new_full((B, 1), -1),
                              targets.valid.new_zeros(B, 1))
        priors = make_priors(outputs.level_shapes, self.strides, device=dev)
        pad = host_tensor([m['pad_shape'][:2] for m in metas], dev)  # (B, 2) each image's own h, w
        valid = priors.valid_mask(pad)  # (B, A)
        gt_boxes = targets.boxes.float()
        asg = atss_assign(priors, gt_boxes, targets.valid, pad, topk=self.topk,
                          octave_base_scale=self.octave_base_scale)
        pos = (asg.assigned >= 0) & valid  # (B, A)
        g = asg.assigned.clamp(min=0)  # (B, A)
        labels = torch.where(pos, targets.labels.gather(1, g), self.num_classes)
        boxes = torch.where(pos[..., None], gt_boxes.gather(1, g[..., None].expand(*g.shape, 4)), 0.0)
        return PriorTargets(priors, valid, asg.assigned, pos, labels, boxes, pos.sum(1))

    def positives(self, outputs: HeadOutputs, t: PriorTargets) -> Positives:
        """Step 4: decode every prior's box (in stride units, as mmdet), the IoU with its gt (the
        QFL target) and the box terms' weight w = max_c sigmoid(cls logit), at positives."""
        R = self.reg_max
        reg = flatten_reg(outputs.reg, R).float().contiguous()  # (B, A, 4, R+1)
        centres = t.priors.centres  # (A, 2) prior points / stride
        pred = distance2bbox(centres, integral(reg))  # (B, A, 4)
        # negatives get a finite stand-in target (a 2x2 box at the prior) so that their masked-out
        # GIoU / DFL never produce NaN, whose gradient would leak through the mask
        stand_in = torch.cat([centres - 1, centres + 1], -1)  # (A, 4)
        tgt = torch.where(t.pos[..., None], t.boxes / t.priors.strides[:, None], stand_in)  # (B, A, 4)
        with torch.no_grad():
            quality = torch.where(t.pos, aligned_iou(pred, tgt), 0.0)  # (B, A)
            best_logit = class_logits(outputs).amax(1).float()  # (B, A)
            weight = torch.where(t.pos, best_logit.sigmoid(), 0.0)  # (B, A)
        return Positives(reg, pred, tgt, centres, quality, weight)

    def loss_sums(self, outputs: HeadOutputs, t: PriorTargets, p: Positives) -> dict[str, Tensor]:
        """Step 5: each term summed over the batch, before normalisation."""
        # fused_qfl's chunk loop is a CPU-cache trick sized by the maps: under compile_loss inductor
        # fuses the readable QFL itself, and the loop would specialise the graph to the image shape
        if self.fused_qfl and not torch.compiler.is_compiling():
            from .fast.qfl import fused_qfl_sum
            loss_cls = fused_qfl_sum(outputs.cls, t.valid, t.labels, p.quality)
        else:
            cls = class_logits(outputs).float()  # (B, C, A)
            classes = torch.arange(self.num_classes, device=cls.device)[:, None]  # (C, 1)
            score = torch.where(t.labels[:, None] == classes, p.quality[:, None], 0.0)  # (B, C, A)
            loss_cls = (quality_focal_loss(cls, score, self.beta) * t.valid[:, None]).sum()
        giou = giou_loss(p.pred_boxes, p.target_boxes, eps=self.giou_eps)  # (B, A)
        edges = bbox2distance(p.centres, p.target_boxes, self.reg_max, eps=0.1)  # (B, A, 4) in [0, R)
        dfl = distribution_focal_loss(p.reg, edges).sum(-1)  # (B, A) over the 4 edges
        return {'loss_cls': loss_cls,
                'loss_bbox': (p.weight * giou).sum() / (1 + EPS32),
                'loss_dfl': (p.weight * dfl).sum() / (4 + EPS32)}

    def normalisers(self, t: PriorTargets, p: Positives) -> dict[str, Tensor]:
        """Step 6, MMDetection's ``GFLHead.loss_by_feat`` normalisers:

        * loss_cls / (N + eps), N = sum over images of max(positives, 1): QFL is summed over
          every prior and class, so dividing by the number of positives keeps it from growing
          with the image size or the number of negatives (mmdet's ``avg_factor``; an image with
          no positive counts 1 so that an empty batch does not divide by 0).
        * loss_bbox and loss_dfl / W, W = max(sum of the positives' weights w, 1): the box terms
          are a w-weighted mean (confident predictions count more), and the sums above are
          already divided by mmdet's ``avg_factor`` 1 (GIoU) and 4 (DFL: the mean over 4 edges).

        In a distributed run N and W are averaged over the processes (``reduce_mean``; W before
        its clamp), so every process divides by the same number and DDP's gradient average
        equals the gradient of the whole batch's loss; the per-process loss values are those
        MMDetection logs. Plain tensors (no ``.item()``): no host synchronisation.
        """
        n = t.num_pos.clamp(min=1).sum().float()
        w = p.weight.sum()
        n, w = reduce_mean(torch.stack([n, w.detach()])).unbind()  # n >= 1 already
        w = w.clamp(min=1)
        return {'loss_cls': n + EPS32, 'loss_bbox': w, 'loss_dfl': w}
