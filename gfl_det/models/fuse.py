"""Inference-time folding of every backbone BatchNorm into the convolution before it.

With ``norm_eval`` the backbone's BNs are fixed affine maps, so ``conv -> bn`` equals one conv
with rescaled weights and a bias: one pass over each activation map fewer. The fused model
computes the same detections (to float rounding) but its state dict no longer has mmdet's
``bn`` keys: fuse after loading weights, for inference or export only.
"""
from __future__ import annotations

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .backbone import ResNet


def _fuse_pair(parent: nn.Module, conv_name: str, bn_name: str) -> None:
    conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
    if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, nn.Identity())


def fuse_conv_bn(backbone: ResNet) -> ResNet:
    """Fold the BNs of a ResNet (in eval mode) into its convs, in place."""
    if backbone.training:
        raise RuntimeError("fuse_conv_bn needs the model in eval mode (call model.eval() first)")
    _fuse_pair(backbone, "conv1", "bn1")
    for m in backbone.modules():
        for i in (1, 2, 3):
            _fuse_pair(m, f"conv{i}", f"bn{i}")
        ds = getattr(m, "downsample", None)
        if isinstance(ds, nn.Sequential) and len(ds) == 2:
            _fuse_pair(ds, "0", "1")
    return backbone


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode + BN folding of the detector's backbone, in place; returns the model."""
    model.eval()
    fuse_conv_bn(model.backbone)
    return model
