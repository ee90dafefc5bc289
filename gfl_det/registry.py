"""mmengine imports ``<scope>.registry`` when it switches to a registry scope (as ``mmdet.registry``):
for scope ``'gfl_det'`` this is it. The registries live in :mod:`gfl_det.mm.registry`."""
from .mm.registry import *  # noqa: F401,F403
from .mm.registry import __all__  # noqa: F401
