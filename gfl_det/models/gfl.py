"""The GFL detector: ResNet -> FPN -> GFL head, with training loss and inference.

Legend: B images, G gt boxes (padded), A priors over all levels, C classes, R = reg_max,
K = L * topk ATSS candidate slots per gt.

The loss works in *candidate-slot* space: ATSS picks K candidate priors per gt, and every
positive prior is exactly one slot (its gt's). So all positive-sample terms (QFL target,
GIoU, DFL) are computed on the (B, G, K) slots flattened, with a mask on accelerators -- no
``nonzero``, no host synchronisation, no per-image or per-level loop -- and on the positive
slots alone on the CPU, where compacting them costs no synchronisation. The negative part of
QFL is dense over (B, A, C); at positive (prior, class) pairs it is replaced by the positive
term.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..assigner import Assignment, atss_assign
from ..boxes import bbox2distance, distance2bbox, aligned_iou
from ..host import host_tensor
from ..losses import dfl_from_log_probs, giou_loss, qfl_sum
from ..postprocess import flatten_cls, flatten_reg, gfl_predict, integral
from ..priors import Priors, make_priors
from .backbone import ResNet
from .fpn import FPN
from .gfl_head import GFLHead

EPS32 = float(torch.finfo(torch.float32).eps)  # mmdet adds this to every avg_factor

DEFAULT_TRAIN_CFG = dict(assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1, debug=False)
DEFAULT_TEST_CFG = dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.6),
                        max_per_img=100)
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class GFL(nn.Module):
    def __init__(self, backbone: ResNet, neck: FPN, bbox_head: GFLHead, train_cfg: dict | None = None,
                 test_cfg: dict | None = None, loss_weights: dict | None = None, beta: float = 2.0,
                 octave_base_scale: float = 8.0, class_names: Sequence[str] | None = None,
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD, channels_last: bool = False):
        super().__init__()
        self.backbone, self.neck, self.bbox_head = backbone, neck, bbox_head
        self.train_cfg = {**DEFAULT_TRAIN_CFG, **(train_cfg or {})}
        self.test_cfg = {**DEFAULT_TEST_CFG, **(test_cfg or {})}
        self.loss_weights = {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_dfl": 0.25, **(loss_weights or {})}
        self.beta, self.octave_base_scale = beta, octave_base_scale
        self.class_names = tuple(class_names) if class_names else None
        # not persistent: MMDetection keeps mean/std out of the state dict too
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._channels_last = False
        self.channels_last = channels_last
        # Positive-slot compaction in the loss: None = on the CPU only (where it costs no host
        # synchronisation); True / False force it (tests compare the two paths).
        self.compact_positives: bool | None = None

    @property
    def channels_last(self) -> bool:
        """Convolution weights and the input batch in the channels-last (NHWC) memory layout.

        The same arithmetic in another layout (results equal up to float summation order); on a
        CPU oneDNN runs NHWC convolutions without layout reorders: R50 inference 1 x 800x1216
        ~20-25 % faster here. Off by default (MMDetection's layout). Setting it converts the
        weights in place; ``load_state_dict`` keeps the layout (``copy_``)."""
        return self._channels_last

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        self._channels_last = bool(value)
        self.to(memory_format=torch.channels_last if value else torch.contiguous_format)

    @property
    def num_classes(self) -> int:
        return self.bbox_head.num_classes

    @property
    def reg_max(self) -> int:
        return self.bbox_head.reg_max

    # ------------------------------------------------------------------ forward
    def preprocess(self, inputs: Tensor, metas: Sequence[dict]) -> Tensor:
        """uint8/float RGB (B, 3, Hb, Wb) -> normalised float, zero outside each img_shape.

        MMDetection normalises and then pads with zeros; padding the uint8 batch first and
        masking afterwards gives the same tensor.
        """
        x = (inputs.to(self.pixel_mean.device, non_blocking=True).float() - self.pixel_mean) / self.pixel_std
        B, _, H, W = x.shape
        hw = [tuple(m["img_shape"][:2]) for m in metas]
        if any(h < H or w < W for h, w in hw):  # decided from the metas: no host sync
            hw_t = host_tensor(hw, x.device)
            rows = torch.arange(H, device=x.device)[None, :, None] < hw_t[:, 0, None, None]
            cols = torch.arange(W, device=x.device)[None, None, :] < hw_t[:, 1, None, None]
            x = x * (rows & cols)[:, None].to(x.dtype)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return self.bbox_head(self.neck(self.backbone(x)))

    def priors_for(self, cls_scores: list[Tensor]) -> Priors:
        return make_priors([tuple(c.shape[-2:]) for c in cls_scores], self.bbox_head.strides,
                           device=cls_scores[0].device)

    # ------------------------------------------------------------------ training
    def loss(self, x: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
             metas: Sequence[dict]) -> dict[str, Tensor]:
        cls_scores, bbox_preds = self(x)
        return self.loss_by_feat(cls_scores, bbox_preds, gt_boxes, gt_labels, gt_valid, metas)

    def assign(self, cls_scores: list[Tensor], gt_boxes: Tensor, gt_valid: Tensor,
               metas: Sequence[dict]) -> tuple[Priors, Tensor, Assignment]:
        priors = self.priors_for(cls_scores)
        pad = host_tensor([m["pad_shape"][:2] for m in metas], gt_boxes.device)
        valid = priors.valid_mask(pad)  # (B, A)
        asg = atss_assign(priors, gt_boxes.float(), gt_valid, pad, topk=self.train_cfg["assigner"].get("topk", 9),
                          octave_base_scale=self.octave_base_scale)
        return priors, valid, asg

    def loss_by_feat(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], gt_boxes: Tensor,
                     gt_labels: Tensor, gt_valid: Tensor, metas: Sequence[dict]) -> dict[str, Tensor]:
        """QFL + GIoU + DFL from head outputs, normalised as MMDetection's ``GFLHead.loss_by_feat``.

        Normalisers (the easiest thing to get subtly wrong, so all here):
          * loss_cls  = sum of QFL over valid priors x classes / (sum_i max(num_pos_i, 1) + eps)
            -- an image with no positive counts 1 (mmdet's SamplingResult.avg_factor);
          * loss_bbox = 2    * sum_pos w * (1 - GIoU)       / (1 + eps) / W
          * loss_dfl  = 0.25 * sum_pos w * sum_sides DFL    / (4 + eps) / W
            with w = max over classes of sigmoid(cls logit) of the positive (detached) and
            W = max(sum_pos w, 1). The (1 + eps) and (4 + eps) are mmdet's ``avg_factor=1.0/4.0``
            calls; the division by W is applied after them, per level in mmdet (same sum).
        Normalisers are plain numbers for autograd (mmdet takes ``.item()`` of them).

        Mixed precision: the head outputs may be bf16/fp16 (autocast); everything here --
        assignment, QFL's sigmoid/BCE, DFL's softmax, the decoded boxes and GIoU -- runs in
        float32 with autocast switched off.
        """
        with torch.autocast(device_type=cls_scores[0].device.type, enabled=False):
            return self._loss_by_feat(cls_scores, bbox_preds, gt_boxes, gt_labels, gt_valid, metas)

    def _loss_by_feat(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], gt_boxes: Tensor,
                      gt_labels: Tensor, gt_valid: Tensor, metas: Sequence[dict]) -> dict[str, Tensor]:
        B, G = gt_valid.shape
        R = self.reg_max
        priors, valid, asg = self.assign(cls_scores, gt_boxes, gt_valid, metas)
        # class logits stay per level (B, C, H, W): QFL and the positives' rows read them there;
        # box logits go side by side as (B, 4(R+1), A) -- a plain copy of each map, not the
        # (B, A, 4(R+1)) transpose -- and only the candidate slots' columns are read from it
        cls_levels = [c.float() for c in cls_scores]
        reg = torch.cat([r.float().flatten(2) for r in bbox_preds], 2)
        gt_boxes = torch.where(gt_valid[..., None], gt_boxes.float(), gt_boxes.new_zeros(()).float())
        labels = torch.where(gt_valid, gt_labels, torch.zeros_like(gt_labels))

        # the candidate slots (B, G, K), flattened: image, gt and prior of each; positive or not
        pos = asg.pos
        K = asg.cand_idx.shape[2]
        dev = reg.device
        img = torch.arange(B, device=dev)[:, None, None].expand(B, G, K).reshape(-1)
        gt = torch.arange(G, device=dev)[None, :, None].expand(B, G, K).reshape(-1)
        prior = asg.cand_idx.reshape(-1)
        posf = pos.reshape(-1).to(reg.dtype)
        compact = self.compact_positives
        if compact is None:
            compact = dev.type == "cpu"
        if compact:
            # On the CPU there is no device to wait for, so the slots are compacted to the
            # positives (~15% of them): every box term below then reads ~7x fewer logits. On
            # an accelerator all slots stay, masked by posf: no host synchronisation.
            keep = pos.reshape(-1).nonzero().squeeze(1)
            img, gt, prior, posf = img[keep], gt[keep], prior[keep], posf[keep]
        reg_slot = reg[img, :, prior].view(-1, 4, R + 1)  # (N, 4, R+1)
        stride = priors.strides[prior][:, None]  # (N, 1)
        centre = priors.points[prior] / stride
        logp = torch.log_softmax(reg_slot, -1)  # shared by the integral and DFL
        dist = torch.nn.functional.linear(logp.exp(), self.bbox_head.integral.project.float())  # (N, 4)
        pred_box = distance2bbox(centre, dist)
        tgt_box = gt_boxes[img, gt] / stride
        with torch.no_grad():
            q = aligned_iou(pred_box.detach(), tgt_box)  # QFL quality target

        # QFL: dense negatives over every valid prior and class + the positives at their class;
        # the same pass gives every prior's largest class logit for the box losses' weights
        loss_cls_sum, prior_max = qfl_sum(cls_levels, valid, img, prior, labels[img, gt], q, posf, self.beta)
        w = prior_max[img, prior].sigmoid() * posf  # detached
        qfl_avg = pos.flatten(1).sum(1).clamp(min=1).sum().to(reg.dtype)  # a tensor: no host sync

        w_sum = w.sum()
        bbox_avg = w_sum.clamp(min=1)
        loss_giou = (w * giou_loss(pred_box, tgt_box)).sum() / (1 + EPS32)
        dfl_t = bbox2distance(centre, tgt_box, R, 0.1)
        loss_dfl = (dfl_from_log_probs(logp, dfl_t).sum(-1) * w).sum() / (4 + EPS32)
        lw = self.loss_weights
        return {
            "loss_cls": lw["loss_cls"] * loss_cls_sum / (qfl_avg + EPS32),
            "loss_bbox": lw["loss_bbox"] * loss_giou / bbox_avg,
            "loss_dfl": lw["loss_dfl"] * loss_dfl / bbox_avg,
        }

    @torch.no_grad()
    def targets(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], gt_boxes: Tensor, gt_labels: Tensor,
                gt_valid: Tensor, metas: Sequence[dict]) -> dict[str, Tensor]:
        """Dense per-prior targets in MMDetection's layout (for inspection and the parity tests):
        labels (B, A) (C = background), label_weights (B, A), bbox_targets (B, A, 4) (input px),
        qfl_score (B, A), bbox_weights (B, A) (w of positives, 0 elsewhere), assigned (B, A)."""
        B, G = gt_valid.shape
        priors, valid, asg = self.assign(cls_scores, gt_boxes, gt_valid, metas)
        cls = flatten_cls(cls_scores).float()
        reg = flatten_reg(bbox_preds, self.reg_max).float()
        A = cls.shape[1]
        a = asg.assigned
        pos = a >= 0
        g = a.clamp(min=0)
        labels = torch.where(pos, gt_labels.gather(1, g), torch.full_like(a, self.num_classes))
        boxes = torch.where(pos[..., None], gt_boxes.float().gather(1, g[..., None].expand(B, A, 4)), 0.0)
        stride = priors.strides[None, :, None]
        centre = priors.points[None] / stride
        pred = distance2bbox(centre.expand(B, A, 2), integral(reg, self.bbox_head.integral.project))
        q = torch.where(pos, aligned_iou(pred, boxes / stride), 0.0)
        w = torch.where(pos, cls.amax(-1).sigmoid(), 0.0)
        return dict(labels=labels, label_weights=valid.float(), bbox_targets=boxes, qfl_score=q,
                    bbox_weights=w, assigned=a, valid=valid, num_pos=asg.num_pos)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, x: Tensor, metas: Sequence[dict], rescale: bool = True) -> list[dict[str, Tensor]]:
        compiled = self.__dict__.get("compiled_features")  # set by compile_for_inference
        cls_scores, bbox_preds = compiled(x) if compiled is not None else self(x)
        return self.predict_by_feat(cls_scores, bbox_preds, metas, rescale)

    def predict_by_feat(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], metas: Sequence[dict],
                        rescale: bool = True) -> list[dict[str, Tensor]]:
        priors = self.priors_for(cls_scores)
        pts = priors.points.split(priors.num_level)
        dev = cls_scores[0].device
        img_shapes = host_tensor([m["img_shape"][:2] for m in metas], dev, torch.float32)
        sf = torch.tensor([m["scale_factor"][:2] for m in metas], dtype=torch.float64) if rescale else None
        cfg = self.test_cfg
        return gfl_predict(cls_scores, bbox_preds, list(pts), list(self.bbox_head.strides), img_shapes, sf,
                           self.bbox_head.integral.project, nms_pre=cfg["nms_pre"], score_thr=cfg["score_thr"],
                           iou_threshold=cfg["nms"]["iou_threshold"], max_per_img=cfg["max_per_img"],
                           min_bbox_size=cfg.get("min_bbox_size", 0))


# ---------------------------------------------------------------------- building from config
def _pop_type(cfg: dict, expected: str) -> dict:
    cfg = dict(cfg)
    t = cfg.pop("type", expected)
    if t != expected:
        raise ValueError(f"unsupported {expected} type {t!r}: gfl_det implements {expected} only")
    return cfg


def build_detector(cfg: dict[str, Any], class_names: Sequence[str] | None = None) -> GFL:
    """Build a GFL detector from an MMDetection-style model dict (``model = dict(type='GFL', ...)``).

    Unknown keys that only concern mmdet's registry plumbing (data_preprocessor, loss types)
    are checked for the values gfl_det implements and otherwise ignored.
    """
    cfg = _pop_type(cfg, "GFL")
    b = _pop_type(cfg["backbone"], "ResNet")
    if b.get("style", "pytorch") != "pytorch":
        raise NotImplementedError("ResNet style 'caffe' is not supported; use style='pytorch'")
    init = b.get("init_cfg") or {}
    backbone = ResNet(depth=b.get("depth", 50), base_channels=b.get("base_channels", 64),
                      out_indices=b.get("out_indices", (0, 1, 2, 3)), frozen_stages=b.get("frozen_stages", 1),
                      norm_eval=b.get("norm_eval", True), zero_init_residual=b.get("zero_init_residual", True),
                      pretrained=init.get("checkpoint") if init.get("type") == "Pretrained" else None)
    n = _pop_type(cfg["neck"], "FPN")
    in_ch = n.get("in_channels", [c for c in backbone.out_channels])
    if list(in_ch) != [backbone.out_channels[i] for i in backbone.out_indices]:
        raise ValueError(f"neck.in_channels {list(in_ch)} do not match the backbone's outputs "
                         f"{[backbone.out_channels[i] for i in backbone.out_indices]}")
    neck = FPN(in_ch, n.get("out_channels", 256), n.get("start_level", 1), n.get("num_outs", 5),
               n.get("add_extra_convs", "on_output"))
    h = _pop_type(cfg["bbox_head"], "GFLHead")
    ag = h.get("anchor_generator", {})
    if list(ag.get("ratios", [1.0])) != [1.0] or ag.get("scales_per_octave", 1) != 1:
        raise NotImplementedError("GFL uses one square anchor per location (ratios=[1.0], scales_per_octave=1)")
    head = GFLHead(h["num_classes"], h.get("in_channels", neck_out(neck)), h.get("feat_channels", 256),
                   h.get("stacked_convs", 4), h.get("reg_max", 16), ag.get("strides", (8, 16, 32, 64, 128)))
    lw = dict(loss_cls=h.get("loss_cls", {}).get("loss_weight", 1.0),
              loss_bbox=h.get("loss_bbox", {}).get("loss_weight", 2.0),
              loss_dfl=h.get("loss_dfl", {}).get("loss_weight", 0.25))
    beta = h.get("loss_cls", {}).get("beta", 2.0)
    dp = cfg.get("data_preprocessor", {})
    return GFL(backbone, neck, head, cfg.get("train_cfg"), cfg.get("test_cfg"), loss_weights=lw, beta=beta,
               octave_base_scale=ag.get("octave_base_scale", 8), class_names=class_names,
               mean=dp.get("mean", MEAN), std=dp.get("std", STD), channels_last=cfg.get("channels_last", False))


def neck_out(neck: FPN) -> int:
    return neck.fpn_convs[0].conv.out_channels
