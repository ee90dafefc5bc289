"""ResNet 18/34/50/101/152, "pytorch" style (stride on the 3x3 conv), MMDetection's module names.

Module names equal both MMDetection's ``ResNet`` and torchvision's (``conv1``, ``bn1``,
``layerN.i.convK``, ``layerN.i.downsample.{0,1}``), so mmdet checkpoints and torchvision
ImageNet weights load without a conversion table. ``base_channels`` scales the widths
(64 for the standard network).
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


def conv_bn(conv: nn.Module, bn: nn.Module, x: Tensor) -> Tensor:
    """``bn(conv(x))``; a BN marked by the ``model.fast.fold_bn`` switch is folded into the
    convolution while it is in eval mode (gfl_det/fast/fold_bn.py)."""
    if getattr(bn, "fold_into_conv", False) and not bn.training and isinstance(conv, nn.Conv2d):
        from ..fast.fold_bn import folded_conv_bn
        return folded_conv_bn(conv, bn, x)
    return bn(conv(x))


def _downsample(ds: nn.Module, x: Tensor) -> Tensor:
    return conv_bn(ds[0], ds[1], x) if isinstance(ds, nn.Sequential) and len(ds) == 2 else ds(x)


def _maybe_checkpoint(block: nn.Module, x: Tensor) -> Tensor:
    """``block.block_forward(x)``, recomputed in backward instead of kept (``with_cp``, as
    MMDetection: only where the input needs a gradient)."""
    if block.with_cp and x.requires_grad and torch.is_grad_enabled():
        return checkpoint(block.block_forward, x, use_reentrant=False)
    return block.block_forward(x)


class BasicBlock(nn.Module):
    expansion = 1
    with_cp = False  # ResNet(with_cp=True): recompute the block in backward (less memory)

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        return _maybe_checkpoint(self, x)

    def block_forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else _downsample(self.downsample, x)
        out = self.relu(conv_bn(self.conv1, self.bn1, x))
        out = conv_bn(self.conv2, self.bn2, out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4
    with_cp = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        return _maybe_checkpoint(self, x)

    def block_forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else _downsample(self.downsample, x)
        out = self.relu(conv_bn(self.conv1, self.bn1, x))
        out = self.relu(conv_bn(self.conv2, self.bn2, out))
        out = conv_bn(self.conv3, self.bn3, out)
        return self.relu(out + identity)


ARCH = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3))}


class ResNet(nn.Module):
    """ResNet returning C2..C5 (``out_indices`` selects).

    Args:
        depth: 18, 34, 50, 101 or 152.
        base_channels: width of the stem and of stage 1 (64 standard).
        frozen_stages: stages whose parameters are frozen and BN kept in eval (1 = stem + layer1;
            -1 = none).
        norm_eval: keep every BN in eval mode (running statistics, no update) even in
            ``train()``, as MMDetection does for detection fine-tuning with small batches.
        with_cp: recompute each residual block's activations in backward instead of keeping
            them (``torch.utils.checkpoint``; MMDetection's key): less memory, one more forward
            of the checkpointed blocks. Needs ``norm_eval`` (the recomputation would update
            training-mode BN statistics a second time).
        pretrained: None, a local checkpoint path, or ``"torchvision://resnet50"``-style name
            (torchvision downloads it where a network is available).
    """

    def __init__(self, depth: int = 50, base_channels: int = 64, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = 1, norm_eval: bool = True, zero_init_residual: bool = True,
                 pretrained: str | None = None, with_cp: bool = False):
        super().__init__()
        if depth not in ARCH:
            raise ValueError(f"ResNet depth must be one of {sorted(ARCH)}, got {depth}")
        if with_cp and not norm_eval:
            raise ValueError("backbone with_cp=True needs norm_eval=True: the checkpointed blocks run their "
                             "forward again in backward, which would update training-mode BatchNorm "
                             "statistics twice; set norm_eval=True or with_cp=False")
        block, layers = ARCH[depth]
        self.depth, self.out_indices = depth, tuple(out_indices)
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.conv1 = nn.Conv2d(3, base_channels, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = base_channels
        self.out_channels = []
        for i, n in enumerate(layers):
            planes, stride = base_channels * 2 ** i, 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                           nn.BatchNorm2d(planes * block.expansion))
            blocks = [block(inplanes, planes, stride, downsample)]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes) for _ in range(n - 1)]
            for blk in blocks:
                blk.with_cp = with_cp
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(inplanes)
        self.init_weights(zero_init_residual)
        if pretrained:
            load_pretrained_backbone(self, pretrained)
        self._freeze_stages()

    def init_weights(self, zero_init_residual: bool = True) -> None:
        """MMDetection's default init: Kaiming-normal convs (fan_out), BN = 1/0, last BN of each
        residual block zero (so every block starts as an identity)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _frozen_modules(self) -> list[nn.Module]:
        mods = []
        if self.frozen_stages >= 0:
            mods += [self.conv1, self.bn1]
        mods += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        self._freeze_stages()
        if mode and not getattr(self, "_checked_frozen_random", False):
            self._checked_frozen_random = True
            self._warn_if_frozen_random()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _warn_if_frozen_random(self) -> None:
        """Training with a frozen stem or fixed BN statistics makes sense for pretrained weights
        only: warn when the stem was never loaded (BN statistics still at their init, 0 and 1)."""
        if self.frozen_stages < 0 and not self.norm_eval:
            return
        if self.bn1.running_mean.any() or not bool((self.bn1.running_var == 1).all()):
            return  # pretrained or loaded weights
        what = []
        if self.frozen_stages >= 0:
            stages = {0: "", 1: " and stage 1"}.get(self.frozen_stages, f" and stages 1-{self.frozen_stages}")
            what.append(f"frozen_stages={self.frozen_stages} keeps the random stem{stages} as initialised")
        if self.norm_eval:
            what.append("norm_eval=True keeps every BatchNorm at its initial statistics (mean 0, variance 1)")
        warnings.warn(
            f"ResNet-{self.depth} trains from random weights (no pretrained init_cfg, nothing loaded), but "
            f"{' and '.join(what)}. From scratch set model.backbone frozen_stages=-1 and norm_eval=False (as "
            f"configs/gfl_r18_bccd.py), or give pretrained weights in model.backbone.init_cfg (README, Install).",
            UserWarning, stacklevel=3)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu(conv_bn(self.conv1, self.bn1, x))
        x = self.maxpool(x)
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


class PretrainedWeightsError(FileNotFoundError):
    """The backbone's pretrained weights cannot be had (no such file, or the download failed);
    the message names both ways on."""


WAYS_ON = ("Two ways on: (1) a local file -- download it once where there is internet (torchvision caches "
           "'torchvision://NAME' in ~/.cache/torch/hub/checkpoints/) and set model.backbone.init_cfg.checkpoint="
           "'/path/to/resnet.pth' (a torchvision ResNet state dict or an mmdet/mmpretrain checkpoint), e.g. "
           "--cfg-options model.backbone.init_cfg.checkpoint=/path/to/resnet.pth; or (2) train from scratch: "
           "model.backbone.init_cfg=None with frozen_stages=-1 and norm_eval=False (as configs/gfl_r18_bccd.py; "
           "from scratch needs a longer schedule).")


def _read_backbone_state(source: str) -> dict:
    if source.startswith("torchvision://"):
        import torchvision
        name = source[len("torchvision://"):]
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            return weights.get_state_dict(progress=True)
        except OSError as e:  # urllib's URLError / HTTPError, a refused or timed-out connection
            raise PretrainedWeightsError(
                f"could not download the pretrained backbone {source!r} ({weights.url}): "
                f"{type(e).__name__}: {getattr(e, 'reason', e)}. {WAYS_ON}") from None
    if not os.path.isfile(source):
        raise PretrainedWeightsError(f"pretrained backbone weights not found: {source!r} "
                                     f"(model.backbone.init_cfg.checkpoint). {WAYS_ON}")
    obj = torch.load(source, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a state dict, found {type(state).__name__}")
    return state


def load_pretrained_backbone(model: ResNet, source: str) -> None:
    """Load ImageNet weights (torchvision ResNet keys, or prefixed 'backbone.' keys) into ``model``.

    The classifier (``fc.*``) is dropped; any other missing or unexpected key is an error, so a
    wrong depth or width does not silently train from scratch.
    """
    state = _read_backbone_state(source)
    clean = {}
    for k, v in state.items():
        for pre in ("module.", "backbone."):
            if k.startswith(pre):
                k = k[len(pre):]
        if not k.startswith("fc."):
            clean[k] = v
    own = model.state_dict()
    missing = [k for k in own if k not in clean]
    unexpected = [k for k in clean if k not in own]
    bad_shape = [f"{k}: file {tuple(clean[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in clean and clean[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"pretrained weights {source!r} do not fit ResNet-{model.depth}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {bad_shape[:5]} (check backbone depth / "
            f"base_channels in the config)")
    model.load_state_dict(clean, strict=True)
    log.info("loaded pretrained backbone weights from %s", source)
