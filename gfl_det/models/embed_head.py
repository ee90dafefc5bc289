"""The identity-embedding branch: a conv tower over the FPN levels to a D-dim, L2-normalised
embedding per location (JDE / FairMOT put such a branch beside a one-stage detector's heads).

Legend: B images, C_in FPN channels, F tower channels, D embedding dimension, L levels,
H_l x W_l the map of level l, A = sum_l H_l W_l priors (in (level, y, x) order, as everywhere),
N rows read (the loss's selected positives in training, the kept detections at inference),
k = stacked_convs, P = 2k + 1.

    FPN P3..P7 --(shared over levels)--> k x [conv3x3 (+ GN(32)) + ReLU]     (B, F, H_l, W_l)
    rows read at N priors (N, F) --> project: BN over the rows (BNNeck) --> conv1x1 to D
                                     --> x / |x| over D                       (N, D)

Only the rows that are read are computed to the end, never every location of every level:

* ``norm=None`` (the default, FairMOT's identity head has no norm either): every layer of the
  tower sees only a location's neighbourhood, so a row's embedding depends on the P x P patch of
  the FPN map around it alone. ``HeadOutputs.embed`` holds the FPN maps themselves and
  :meth:`EmbedHead.rows` runs the tower on the N patches (valid convolutions, zero outside the
  map where the dense convolutions' padding would be). Training and inference then cost the
  tower's work at N locations instead of all A of the batch: the branch costs next to nothing.
* ``norm='GN'``: GroupNorm's statistics span the whole map, so the tower runs densely and
  ``HeadOutputs.embed`` holds its features; only the 1x1 conv and the L2 norm act on the N rows.

Both give the values of the dense tower read afterwards (``tests/test_embed.py``);
:meth:`EmbedHead.dense` / :meth:`EmbedHead.dense_embeddings` give the whole maps (analysis, ONNX
export).

Configured as ``model.bbox_head.embed = dict(dim=128, stacked_convs=2, loss=dict(type='triplet',
...), loss_weight=1.0, max_per_gt=4)`` (:func:`build_embedding`); it is a submodule of the GFL head
named ``embed`` (state-dict keys ``bbox_head.embed.*``), created only when configured, so a model
without it keeps exactly MMDetection's keys. The loss is :class:`gfl_det.embed_loss.EmbeddingLoss`,
an extra term of the criterion. Each kept detection reads its embedding at its prior
(:func:`attach_embeddings`, from ``prior_idx``).

Deviation from the GFL towers: the last layer is a 1x1 conv (the tower's 3x3 convs already see
the neighbourhood). Its cost on the R18 training step is measured in the README (Detect and identify).
"""
from __future__ import annotations

import math
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


class ConvReLU(nn.Module):
    """conv3x3 (with bias) + ReLU: a tower layer without normalisation."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class EmbedHead(nn.Module):
    """FPN maps [(B, C_in, H_l, W_l)] -> the maps ``HeadOutputs.embed`` holds (``forward``), from
    which :meth:`rows` computes the D-dim unit embeddings of the rows read (see the module doc)."""

    def __init__(self, in_channels: int, feat_channels: int = 256, dim: int = 128,
                 stacked_convs: int = 2, norm: Optional[str] = None, num_groups: int = 32,
                 feature_grad: float = 1.0, bn_neck: bool = True):
        super().__init__()
        if norm not in (None, 'GN'):
            raise ValueError(f"bbox_head.embed.norm={norm!r}: supported None (no norm) and 'GN'")
        self.dim, self.feature_grad, self.norm = int(dim), float(feature_grad), norm
        num_groups = math.gcd(num_groups, feat_channels)  # GN(32) where F allows, else groups dividing F
        cins = [in_channels] + [feat_channels] * (stacked_convs - 1)
        self.convs = nn.ModuleList(ConvGN(c, feat_channels, num_groups) if norm == 'GN' else ConvReLU(c, feat_channels)
                                   for c in cins[:stacked_convs])
        self.out = nn.Conv2d(feat_channels if stacked_convs else in_channels, dim, 1)
        # BNNeck (Luo et al., "Bag of tricks for person re-identification", 2019): the rows' features
        # standardised over the batch's rows (running statistics at inference) before the 1x1 conv.
        # Without it the tower's ReLU features share one large mean direction, every embedding
        # starts near the same point, and batch-hard triplets can stay collapsed there (loss = margin)
        self.bn_neck = nn.BatchNorm1d(self.out.in_channels) if bn_neck else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if norm is None and m is not self.out:  # no norm to rescale: keep the activations' scale
                    nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
                else:  # as the GFL towers: N(0, 0.01)
                    nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def sparse(self) -> bool:
        """True when a row's embedding depends on its P x P patch alone (no norm)."""
        return self.norm is None

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """FPN maps -> ``HeadOutputs.embed``: the FPN maps themselves (``norm=None``; the tower
        runs on the rows read) or the dense tower's features [(B, F, H_l, W_l)] (``norm='GN'``)."""
        return list(feats) if self.sparse else [self._tower(self._scale_grad(x)) for x in feats]

    def _scale_grad(self, x: Tensor) -> Tensor:
        """The same values; the gradient flowing back into the FPN multiplied by ``feature_grad``
        (0: none). Applied where the tower reads the FPN: the whole maps (GN) or the patches."""
        g = self.feature_grad
        if g == 1.0:
            return x
        return x.detach() if g == 0 else x * g + x.detach() * (1 - g)

    def _tower(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        return x

    def dense(self, maps: Sequence[Tensor]) -> list[Tensor]:
        """``HeadOutputs.embed`` -> the tower's features at every location [(B, F, H_l, W_l)]."""
        return [self._tower(self._scale_grad(x)) for x in maps] if self.sparse else list(maps)

    def rows(self, maps: Sequence[Tensor], b: Tensor, a: Tensor) -> Tensor:
        """``HeadOutputs.embed`` -> float32 unit embeddings (N, D) of image b_i's prior a_i."""
        return self.project(gather_prior_rows(maps, b, a, read=self._patch_tower if self.sparse else None))

    def _patch_tower(self, m: Tensor, b: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """The tower at locations (b, y, x) of one level's map m (B, C, H, W): (n, F), from the
        P x P patches around them, each layer a valid convolution, zero outside the map."""
        k, (H, W) = len(self.convs), m.shape[-2:]
        off = torch.arange(-k, k + 1, device=y.device)  # (P,)
        ys, xs = y[:, None] + off, x[:, None] + off  # (n, P)
        inside = (((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :])[:, None]  # (n, 1, P, P)
        patch = m[b[:, None, None], :, ys.clamp(0, H - 1)[:, :, None], xs.clamp(0, W - 1)[:, None, :]]  # (n, P, P, C)
        patch = self._scale_grad(patch)
        h = patch.permute(0, 3, 1, 2) * inside  # (n, C, P, P): zero past the border, as the padding
        for c, layer in enumerate(self.convs, 1):
            h = layer.act(F.conv2d(h, layer.conv.weight, layer.conv.bias))  # (n, F, P - 2c, P - 2c)
            if c < k:
                h = h * inside[..., c:-c, c:-c]  # the next layer sees zero padding there, not values
        return h.flatten(1)  # (n, F): the 1 x 1 centre

    def project(self, rows: Tensor) -> Tensor:
        """Tower features (..., F) -> float32 embeddings (..., D) on the unit sphere: the 1x1 conv,
        then L2 (in float32 also under autocast / a half-precision export)."""
        w = self.out.weight.flatten(1)  # (D, F)
        rows = rows.to(w.dtype)
        if self.bn_neck is not None:
            bn, shape = self.bn_neck, rows.shape
            batch_stats = bn.training and rows[..., 0].numel() > 1  # one row has no batch statistics
            rows = F.batch_norm(rows.reshape(-1, shape[-1]), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                batch_stats, bn.momentum, bn.eps).reshape(shape)
        return F.normalize(F.linear(rows, w, self.out.bias).float(), dim=-1)

    def dense_embeddings(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """FPN maps -> embeddings of every location [(B, D, H_l, W_l)] (analysis; the model itself
        computes only the rows it reads). In eval mode: in training the BN neck's statistics are
        those of the rows read."""
        return [self.project(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for x in self.dense(self.forward(feats))]


def attach_embeddings(dets: list[dict], maps: Sequence[Tensor], embed: EmbedHead) -> list[dict]:
    """Each image's detections get ``embeddings`` (k, D), computed at their ``prior_idx`` from
    ``HeadOutputs.embed`` (the maps)."""
    b = torch.cat([torch.full_like(d['prior_idx'], i) for i, d in enumerate(dets)])
    rows = embed.rows(maps, b, torch.cat([d['prior_idx'] for d in dets]))
    for d, e in zip(dets, rows.split([len(d['prior_idx']) for d in dets])):
        d['embeddings'] = e
    return dets


def build_embedding(cfg: Optional[dict], in_channels: int, feat_channels: int
                    ) -> tuple[Optional[EmbedHead], Optional[EmbeddingLoss]]:
    """``model.bbox_head.embed`` -> (tower, loss term), or (None, None) when not configured.

    Keys: ``dim`` (128), ``stacked_convs`` (2), ``feat_channels`` (the head's), ``norm`` (None:
    the tower runs on the rows read only; ``'GN'``: densely, as the GFL towers), ``bn_neck``
    (True: BatchNorm over the rows' features before the 1x1 conv), ``loss`` (a dict
    with ``type`` one of :data:`gfl_det.embed_loss.LOSS_TYPES` and that loss's options),
    ``loss_weight`` (1.0), ``max_per_gt`` (4: embeddings per gt entering the loss),
    ``feature_grad`` (1.0: the embedding loss's gradient into the shared FPN is multiplied by it;
    0 trains the tower alone on the detector's features)."""
    if cfg is None:
        return None, None
    cfg = check_keys('bbox_head.embed', dict(cfg), dim=None, stacked_convs=None, feat_channels=None,
                     norm=(None, 'GN'), bn_neck=(True, False), loss=None, loss_weight=None, max_per_gt=None,
                     feature_grad=None)
    dim, convs = int(cfg.get('dim', 128)), int(cfg.get('stacked_convs', 2))
    feat = int(cfg.get('feat_channels') or feat_channels)
    grad = float(cfg.get('feature_grad', 1.0))
    if dim < 1 or convs < 0 or feat < 1 or not 0 <= grad <= 1:
        raise ValueError(f'bbox_head.embed: dim ({dim}) and feat_channels ({feat}) must be >= 1, '
                         f'stacked_convs ({convs}) >= 0, feature_grad ({grad}) in [0, 1]')
    tower = EmbedHead(in_channels, feat, dim, convs, norm=cfg.get('norm'), feature_grad=grad,
                      bn_neck=cfg.get('bn_neck', True))
    loss = EmbeddingLoss(dim, cfg.get('loss'), loss_weight=cfg.get('loss_weight', 1.0),
                         max_per_gt=cfg.get('max_per_gt', 4), rows=tower.rows)
    return tower, loss
