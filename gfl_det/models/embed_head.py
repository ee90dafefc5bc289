"""The identity-embedding branch: a conv tower over the FPN levels to a D-dim, L2-normalised
embedding per location (JDE / FairMOT put such a branch beside a one-stage detector's heads).

Legend: B images, C_in FPN channels, F tower channels, D embedding dimension, L levels,
H_l x W_l the map of level l, A = sum_l H_l W_l priors (in (level, y, x) order, as everywhere),
N selected rows.

    FPN P3..P7 --(shared over levels)--> stacked_convs x [conv3x3 + GN(32) + ReLU] (F channels)
                                    --> conv1x1 to D --> x / |x| over D       [(B, D, H_l, W_l)]

Configured as ``model.bbox_head.embed = dict(dim=128, stacked_convs=2, loss=dict(type='triplet',
...), loss_weight=1.0, max_per_gt=4)`` (:func:`build_embedding`); it is a submodule of the GFL head
named ``embed`` (state-dict keys ``bbox_head.embed.*``), created only when configured, so a model
without it keeps exactly MMDetection's keys. The loss is :class:`gfl_det.embed_loss.EmbeddingLoss`,
an extra term of the criterion. Each kept detection reads its embedding at its prior
(:func:`attach_embeddings`, from ``prior_idx``).

Deviation from the GFL towers: the last layer is a 1x1 conv (the 3x3 of ``gfl_cls`` would cost as
much as a tower conv again; the tower's 3x3 convs already see the neighbourhood). Its cost on the
R18 training step is measured in the README (Detect and identify).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config_check import check_keys
from ..embed_loss import EmbeddingLoss
from ..postprocess import gather_prior_rows
from .gfl_head import ConvGN

__all__ = ['EmbedHead', 'build_embedding', 'attach_embeddings']


class EmbedHead(nn.Module):
    """FPN maps [(B, C_in, H_l, W_l)] -> embeddings [(B, D, H_l, W_l)], unit length over D."""

    def __init__(self, in_channels: int, feat_channels: int = 256, dim: int = 128,
                 stacked_convs: int = 2, num_groups: int = 32, feature_grad: float = 1.0):
        super().__init__()
        self.dim, self.feature_grad = int(dim), float(feature_grad)
        self.convs = nn.ModuleList(ConvGN(in_channels if i == 0 else feat_channels, feat_channels, num_groups)
                                   for i in range(stacked_convs))
        self.out = nn.Conv2d(feat_channels if stacked_convs else in_channels, dim, 1)
        for m in self.modules():  # as the GFL towers: N(0, 0.01), zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for x in feats:
            if self.feature_grad != 1.0:  # the same values; the gradient into the FPN scaled (0: none)
                x = x.detach() if self.feature_grad == 0 else x * self.feature_grad + x.detach() * (1 - self.feature_grad)
            for conv in self.convs:
                x = conv(x)
            out.append(F.normalize(self.out(x), dim=1))  # (B, D, H_l, W_l) on the unit sphere
        return out


def attach_embeddings(dets: list[dict], levels: Sequence[Tensor]) -> list[dict]:
    """Each image's detections get ``embeddings`` (k, D), read at their ``prior_idx``."""
    b = torch.cat([torch.full_like(d['prior_idx'], i) for i, d in enumerate(dets)])
    rows = gather_prior_rows(levels, b, torch.cat([d['prior_idx'] for d in dets])).float()
    for d, e in zip(dets, rows.split([len(d['prior_idx']) for d in dets])):
        d['embeddings'] = e
    return dets


def build_embedding(cfg: Optional[dict], in_channels: int, feat_channels: int
                    ) -> tuple[Optional[EmbedHead], Optional[EmbeddingLoss]]:
    """``model.bbox_head.embed`` -> (tower, loss term), or (None, None) when not configured.

    Keys: ``dim`` (128), ``stacked_convs`` (2), ``feat_channels`` (the head's), ``loss`` (a dict
    with ``type`` one of :data:`gfl_det.embed_loss.LOSS_TYPES` and that loss's options),
    ``loss_weight`` (1.0), ``max_per_gt`` (4: embeddings per gt entering the loss),
    ``feature_grad`` (1.0: the embedding loss's gradient into the shared FPN is multiplied by it;
    0 trains the tower alone on the detector's features)."""
    if cfg is None:
        return None, None
    cfg = check_keys('bbox_head.embed', dict(cfg), dim=None, stacked_convs=None, feat_channels=None,
                     loss=None, loss_weight=None, max_per_gt=None, feature_grad=None)
    dim, convs = int(cfg.get('dim', 128)), int(cfg.get('stacked_convs', 2))
    feat = int(cfg.get('feat_channels') or feat_channels)
    grad = float(cfg.get('feature_grad', 1.0))
    if dim < 1 or convs < 0 or feat < 1 or not 0 <= grad <= 1:
        raise ValueError(f'bbox_head.embed: dim ({dim}) and feat_channels ({feat}) must be >= 1, '
                         f'stacked_convs ({convs}) >= 0, feature_grad ({grad}) in [0, 1]')
    loss = EmbeddingLoss(dim, cfg.get('loss'), loss_weight=cfg.get('loss_weight', 1.0),
                         max_per_gt=cfg.get('max_per_gt', 4))
    return EmbedHead(in_channels, feat, dim, convs, feature_grad=grad), loss
