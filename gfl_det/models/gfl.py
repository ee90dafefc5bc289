"""The GFL detector: ResNet -> FPN -> GFL head, wired together.

Legend: B images, C classes, R = reg_max, A priors over all levels.

The model only wires the parts: the head predicts (:class:`gfl_det.structures.HeadOutputs`),
the criterion (:class:`gfl_det.criterion.GFLCriterion`) turns predictions and
:class:`gfl_det.structures.Targets` into losses, ``gfl_det.postprocess`` turns predictions into
detections. :func:`build_detector` builds it from an MMDetection model dict.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..config_check import check_keys, pop_type
from ..criterion import GFLCriterion
from ..host import host_tensor
from ..postprocess import Candidates, batched_class_nms, gfl_candidates, inverse_scale
from ..priors import make_priors
from ..structures import HeadOutputs, Targets
from .backbone import ResNet
from .embed_head import attach_embeddings, build_embedding
from .fpn import FPN
from .gfl_head import GFLHead

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
DEFAULT_TEST_CFG = dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.6),
                        max_per_img=100)
# gfl_det's speed switches (gfl_det/fast/; the README's Speed section has the measurements)
DEFAULT_FAST = dict(stem_pool=True, fused_qfl=False, fold_bn=False, compile_loss=False)


class GFL(nn.Module):
    def __init__(self, backbone: ResNet, neck: FPN, bbox_head: GFLHead, criterion: GFLCriterion,
                 test_cfg: Optional[dict] = None, class_names: Optional[Sequence[str]] = None,
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD, channels_last: bool = False):
        super().__init__()
        self.backbone, self.neck, self.bbox_head, self.criterion = backbone, neck, bbox_head, criterion
        self.test_cfg = check_test_cfg(test_cfg)
        self.class_names = tuple(class_names) if class_names else None
        # not persistent: MMDetection keeps mean/std out of the state dict too
        self.register_buffer('pixel_mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('pixel_std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._channels_last = False
        self.channels_last = channels_last

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

    # ------------------------------------------------------------------ forward
    def preprocess(self, inputs: Tensor, metas: Sequence[dict]) -> Tensor:
        """uint8/float RGB (B, 3, Hb, Wb) -> normalised float, zero outside each img_shape.

        MMDetection normalises and then pads with zeros; padding the uint8 batch first and
        masking afterwards gives the same tensor.
        """
        x = (inputs.to(self.pixel_mean.device, non_blocking=True).float() - self.pixel_mean) / self.pixel_std
        B, _, H, W = x.shape
        hw = [tuple(m['img_shape'][:2]) for m in metas]
        if any(h < H or w < W for h, w in hw):  # decided from the metas: no host sync
            hw_t = host_tensor(hw, x.device)
            rows = torch.arange(H, device=x.device)[None, :, None] < hw_t[:, 0, None, None]
            cols = torch.arange(W, device=x.device)[None, None, :] < hw_t[:, 1, None, None]
            x = x * (rows & cols)[:, None].to(x.dtype)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Tensor) -> HeadOutputs:
        """Normalised images (B, 3, H, W) -> head outputs."""
        return self.bbox_head(self.neck(self.backbone(x)))

    def loss(self, x: Tensor, targets: Targets, metas: Sequence[dict]) -> dict[str, Tensor]:
        """Normalised images, their ground truth and metas -> the criterion's losses."""
        return self.criterion(self(x), targets, metas)

    @torch.no_grad()
    def predict(self, x: Tensor, metas: Sequence[dict], rescale: bool = True) -> list[dict[str, Tensor]]:
        """Detections per image: ``bboxes`` (k, 4) xyxy (original-image pixels when ``rescale``,
        else network-input pixels), ``scores``, ``labels``, ``prior_idx`` (see
        :func:`gfl_det.postprocess.batched_class_nms`); with an embedding branch also ``embeddings``
        (k, D), each read at its detection's prior."""
        graphed = self.__dict__.get('graphed_predict')  # set by gfl_det.fast.cuda_graph.use_cuda_graphs
        if graphed is not None:
            return graphed(x, metas, rescale)
        compiled = self.__dict__.get('compiled_features')  # set by gfl_det.fast.fuse.compile_for_inference
        return self.predict_by_feat(compiled(x) if compiled is not None else self(x), metas, rescale)

    def predict_by_feat(self, outputs: HeadOutputs, metas: Sequence[dict],
                        rescale: bool = True) -> list[dict[str, Tensor]]:
        dev = outputs.cls[0].device
        img_shapes = host_tensor([m['img_shape'][:2] for m in metas], dev, torch.float32)
        inv_scale = inverse_scale([m['scale_factor'][:2] for m in metas], dev) if rescale else None
        return self.detections(self.candidates(outputs, img_shapes, inv_scale), outputs.embed)

    def candidates(self, outputs: HeadOutputs, img_shapes: Tensor, inv_scale: Optional[Tensor]) -> Candidates:
        """Post-processing before NMS, with this model's ``test_cfg`` (static shapes:
        :func:`gfl_det.postprocess.gfl_candidates`); ``img_shapes`` (B, 2) h, w and ``inv_scale``
        (B, 2) 1 / scale factor (None: input pixels) on the device."""
        priors = make_priors(outputs.level_shapes, self.bbox_head.strides, device=outputs.cls[0].device)
        cfg = self.test_cfg
        return gfl_candidates(outputs.cls, outputs.reg, priors, img_shapes, inv_scale, nms_pre=cfg['nms_pre'],
                              score_thr=cfg['score_thr'], min_bbox_size=cfg['min_bbox_size'])

    def detections(self, cand: Candidates, embed: Optional[list[Tensor]]) -> list[dict[str, Tensor]]:
        """Candidates -> per-image detections: class-aware NMS and ``max_per_img`` (``test_cfg``),
        and with an embedding branch each detection's embedding read from its maps ``embed``."""
        cfg = self.test_cfg
        dets = batched_class_nms(*cand, self.num_classes, cfg['nms']['iou_threshold'], cfg['max_per_img'])
        return dets if embed is None else attach_embeddings(dets, embed, self.bbox_head.embed)


def check_test_cfg(test_cfg: Optional[dict]) -> dict:
    """MMDetection's ``test_cfg`` with defaults, refusing what gfl_det's post-processing does not
    implement (soft-NMS, score voting, ...)."""
    cfg = {**DEFAULT_TEST_CFG, **dict(test_cfg or {})}
    check_keys('test_cfg', cfg, nms_pre=None, min_bbox_size=None, score_thr=None, nms=None, max_per_img=None)
    cfg['nms'] = dict(check_keys('test_cfg.nms', pop_type('test_cfg.nms', cfg['nms'], 'nms'), iou_threshold=None),
                      type='nms')
    cfg['nms'].setdefault('iou_threshold', 0.5)
    return cfg


# ---------------------------------------------------------------------- building from config
def build_detector(cfg: dict[str, Any], class_names: Optional[Sequence[str]] = None) -> GFL:
    """Build a GFL detector from an MMDetection-style model dict (``model = dict(type='GFL', ...)``).

    MMDetection's keys are accepted with the values gfl_det implements; any other ``type`` or
    option is refused naming the key (``gfl_det.config_check``). gfl_det's own keys:
    ``channels_last`` and ``fast`` (``dict(stem_pool=True, fused_qfl=False, fold_bn=False,
    compile_loss=False)``, see gfl_det/fast/);
    ``bbox_head.embed`` adds the identity-embedding branch and its loss (models/embed_head.py).
    """
    cfg = check_keys('model', pop_type('model', cfg, 'GFL'), backbone=None, neck=None, bbox_head=None,
                     train_cfg=None, test_cfg=None, data_preprocessor=None, init_cfg=(None,),
                     channels_last=None, fast=None)
    fast = check_keys('model.fast', {**DEFAULT_FAST, **dict(cfg.get('fast') or {})},
                      stem_pool=(True, False), fused_qfl=(True, False), fold_bn=(True, False),
                      compile_loss=(True, False))
    backbone = _build_backbone(cfg['backbone'], fast['stem_pool'])
    if fast['fold_bn']:
        from ..fast.fold_bn import use_folded_bn
        use_folded_bn(backbone)
    neck = _build_neck(cfg['neck'], backbone)
    h = check_keys('bbox_head', pop_type('bbox_head', cfg['bbox_head'], 'GFLHead'), num_classes=None,
                   in_channels=None, feat_channels=None, stacked_convs=None, reg_max=None,
                   anchor_generator=None, loss_cls=None, loss_bbox=None, loss_dfl=None, bbox_coder=None,
                   norm_cfg=(dict(type='GN', num_groups=32, requires_grad=True),), conv_cfg=(None,),
                   init_cfg=(None,), embed=None)
    ag = check_keys('bbox_head.anchor_generator', pop_type('bbox_head.anchor_generator', h.get('anchor_generator'),
                                                           'AnchorGenerator'),
                    ratios=([1.0], (1.0,), [1], (1,)), octave_base_scale=None, scales_per_octave=(1,), strides=None)
    strides = tuple(ag.get('strides', (8, 16, 32, 64, 128)))
    reg_max = h.get('reg_max', 16)
    head = GFLHead(h['num_classes'], h.get('in_channels', neck.out_channels), h.get('feat_channels', 256),
                   h.get('stacked_convs', 4), reg_max, strides)
    head.embed, embed_loss = build_embedding(h.get('embed'), h.get('in_channels', neck.out_channels),
                                             h.get('feat_channels', 256))
    train_cfg = check_keys('train_cfg', dict(cfg.get('train_cfg') or {}), assigner=None, sampler=None,
                           allowed_border=None, pos_weight=None, debug=None)
    criterion = GFLCriterion(h['num_classes'], reg_max, strides, ag.get('octave_base_scale', 8),
                             loss_cls=h.get('loss_cls'), loss_bbox=h.get('loss_bbox'), loss_dfl=h.get('loss_dfl'),
                             bbox_coder=h.get('bbox_coder'), fused_qfl=fast['fused_qfl'],
                             compile_loss=fast['compile_loss'],
                             extra_terms=None if embed_loss is None else {'embed': embed_loss}, **train_cfg)
    dp = check_keys('data_preprocessor', dict(cfg.get('data_preprocessor') or {}), type=('DetDataPreprocessor',),
                    mean=None, std=None, bgr_to_rgb=(True,), pad_size_divisor=None, pad_value=(0,),
                    batch_augments=(None,), non_blocking=None, boxtype2tensor=(True,))
    return GFL(backbone, neck, head, criterion, cfg.get('test_cfg'), class_names=class_names,
               mean=dp.get('mean', MEAN), std=dp.get('std', STD), channels_last=cfg.get('channels_last', False))


def _build_backbone(cfg: dict, stem_pool: bool) -> ResNet:
    b = check_keys('backbone', pop_type('backbone', cfg, 'ResNet'), depth=None, base_channels=None,
                   num_stages=(4,), out_indices=None, frozen_stages=None, norm_eval=None,
                   zero_init_residual=None, style=('pytorch',), init_cfg=None, pretrained=(None,),
                   norm_cfg=(dict(type='BN', requires_grad=True),), dcn=(None,), with_cp=(True, False),
                   deep_stem=(False,), avg_down=(False,), strides=((1, 2, 2, 2), [1, 2, 2, 2]),
                   dilations=((1, 1, 1, 1), [1, 1, 1, 1]))
    init = dict(b.get('init_cfg') or {})
    if init:
        init = check_keys('backbone.init_cfg', pop_type('backbone.init_cfg', init, 'Pretrained'),
                          checkpoint=None, prefix=(None,), map_location=None)
    backbone = ResNet(depth=b.get('depth', 50), base_channels=b.get('base_channels', 64),
                      out_indices=b.get('out_indices', (0, 1, 2, 3)), frozen_stages=b.get('frozen_stages', 1),
                      norm_eval=b.get('norm_eval', True), zero_init_residual=b.get('zero_init_residual', True),
                      pretrained=init.get('checkpoint'), with_cp=b.get('with_cp', False))
    if stem_pool:
        from ..fast.pool import use_separable_stem_pool
        use_separable_stem_pool(backbone)
    return backbone


def _build_neck(cfg: dict, backbone: ResNet) -> FPN:
    n = check_keys('neck', pop_type('neck', cfg, 'FPN'), in_channels=None, out_channels=None, start_level=None,
                   num_outs=None, add_extra_convs=('on_output',), end_level=(-1,), relu_before_extra_convs=(False,),
                   no_norm_on_lateral=(False,), conv_cfg=(None,), norm_cfg=(None,), act_cfg=(None,),
                   upsample_cfg=(dict(mode='nearest'),),
                   init_cfg=(None, dict(type='Xavier', layer='Conv2d', distribution='uniform')))
    outs = [backbone.out_channels[i] for i in backbone.out_indices]
    in_ch = list(n.get('in_channels', outs))
    if in_ch != outs:
        raise ValueError(f"neck.in_channels {in_ch} do not match the backbone's outputs {outs}")
    return FPN(in_ch, n.get('out_channels', 256), n.get('start_level', 1), n.get('num_outs', 5),
               n.get('add_extra_convs', 'on_output'))
