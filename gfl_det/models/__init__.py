"""Plain-PyTorch GFL detector (no mmengine import)."""
from .backbone import ResNet, load_pretrained_backbone
from .fpn import FPN
from .fuse import compile_for_inference, fuse_for_inference
from .gfl import GFL, build_detector
from .gfl_head import GFLHead
from .winograd import WinogradConv2d, use_winograd, winograd_available

__all__ = ["ResNet", "FPN", "GFLHead", "GFL", "build_detector", "load_pretrained_backbone", "fuse_for_inference", "compile_for_inference",
           "use_winograd", "winograd_available", "WinogradConv2d"]
