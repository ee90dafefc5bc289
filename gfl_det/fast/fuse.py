"""Inference-time folding of every backbone BatchNorm into the convolution before it.

With ``norm_eval`` the backbone's BNs are fixed affine maps, so ``conv -> bn`` equals one conv
with rescaled weights and a bias: one pass over each activation map fewer. The fused model
computes the same detections (to float rounding) but its state dict no longer has mmdet's
``bn`` keys: fuse after loading weights, for inference or export only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval



def _fuse_pair(parent: nn.Module, conv_name: str, bn_name: str) -> None:
    conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
    if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, nn.Identity())


def fuse_conv_bn(backbone: nn.Module) -> nn.Module:
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


class _Features(nn.Module):
    """backbone -> neck -> head, the part of inference worth compiling (post-processing is not:
    its shapes depend on the data)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, bbox_head: nn.Module):
        super().__init__()
        self.backbone, self.neck, self.bbox_head = backbone, neck, bbox_head

    def forward(self, x):
        return self.bbox_head(self.neck(self.backbone(x)))


def compile_for_inference(model: nn.Module, dynamic: bool = True, mode: str | None = None) -> nn.Module:
    """BN folding, then ``torch.compile`` of backbone + neck + head with inductor's freezing
    (weights become constants: convolution weights are pre-packed for the CPU's oneDNN kernels,
    elementwise ops fused), in place; ``model.predict`` uses it from then on.

    ``dynamic=True`` compiles once for any image size (the test set's padded shapes vary); the
    first call pays the compilation (~20 s for R50 on a CPU). Call it last: after loading
    weights and ``.to(device)``; the compiled graph holds the weights as they are then, so do not
    train or load other weights into the model afterwards. Needs a C++ compiler on CPU (Triton
    on GPU), as any ``torch.compile``.

    ``mode``: torch.compile's (None: its default). On a GPU ``'reduce-overhead'`` adds inductor's
    CUDA graphs, recorded per input size under ``dynamic`` (the compiled counterpart of
    ``--cuda-graph``); which pays is for ``tools/gpu_check.sh`` to measure (step ``graph``).
    """
    from torch._inductor import list_mode_options
    fuse_for_inference(model)
    feats = _Features(model.backbone, model.neck, model.bbox_head)
    # torch.compile takes a mode or options, not both: the mode's options, plus freezing
    options = {**(list_mode_options(mode, dynamic) if mode else {}), "freezing": True}
    compiled = torch.compile(feats, dynamic=dynamic, options=options)
    # a plain attribute, not a submodule: the state dict keeps exactly the model's keys
    object.__setattr__(model, "compiled_features", compiled)
    return model
