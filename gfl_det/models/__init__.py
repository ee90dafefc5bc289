"""Plain-PyTorch GFL detector (no mmengine import)."""
from .backbone import ResNet, load_pretrained_backbone
from .fpn import FPN
from .gfl import GFL, build_detector
from .gfl_head import GFLHead

__all__ = ["ResNet", "FPN", "GFLHead", "GFL", "build_detector", "load_pretrained_backbone"]
