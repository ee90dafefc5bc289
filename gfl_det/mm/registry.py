"""gfl_det's mmengine registries (scope ``'gfl_det'``; configs say ``default_scope = 'gfl_det'``).

Each is a child of mmengine's root registry of the same kind, so that a lookup in scope
``'gfl_det'`` finds our modules first and falls back to mmengine's (SGD, LinearLR, LoggerHook,
EpochBasedTrainLoop, ...) without warnings. mmengine imports ``<scope>.registry`` when it
switches to a scope: ``gfl_det/registry.py`` re-exports this module for that.
"""
from __future__ import annotations

import time

from mmengine import registry as mmreg
from mmengine.registry import Registry

__all__ = ['SCOPE', 'MODELS', 'DATASETS', 'DATA_SAMPLERS', 'TRANSFORMS', 'FUNCTIONS', 'METRICS', 'HOOKS',
           'OPTIM_WRAPPERS', 'RUNNERS', 'register_all_modules']

SCOPE = 'gfl_det'
_LOC = ['gfl_det.mm']


def _child(parent: Registry) -> Registry:
    return Registry(parent.name, parent=parent, scope=SCOPE, locations=_LOC)


# a child of every mmengine root registry, so that lookups in scope 'gfl_det' find ours first and
# fall back to mmengine's (SGD, LinearLR, LoggerHook, EpochBasedTrainLoop, ...) without warnings
MODELS = _child(mmreg.MODELS)
DATASETS = _child(mmreg.DATASETS)
DATA_SAMPLERS = _child(mmreg.DATA_SAMPLERS)
TRANSFORMS = _child(mmreg.TRANSFORMS)
FUNCTIONS = _child(mmreg.FUNCTIONS)
METRICS = _child(mmreg.METRICS)
HOOKS = _child(mmreg.HOOKS)
OPTIM_WRAPPERS = _child(mmreg.OPTIM_WRAPPERS)
RUNNERS = _child(mmreg.RUNNERS)
for _name in ('RUNNER_CONSTRUCTORS', 'LOOPS', 'STRATEGIES', 'MODEL_WRAPPERS', 'WEIGHT_INITIALIZERS',
              'OPTIMIZERS', 'OPTIM_WRAPPER_CONSTRUCTORS', 'PARAM_SCHEDULERS', 'EVALUATOR',
              'TASK_UTILS', 'VISUALIZERS', 'VISBACKENDS', 'LOG_PROCESSORS', 'INFERENCERS'):
    if hasattr(mmreg, _name):
        _child(getattr(mmreg, _name))


def register_all_modules() -> None:
    """Importing :mod:`gfl_det.mm` registers everything; this exists for symmetry with mmdet's
    ``register_all_modules`` and sets the default scope when none is set."""
    from mmengine.registry import DefaultScope
    if DefaultScope.get_current_instance() is None:
        DefaultScope.get_instance(f'gfl_det-{time.time()}', scope_name=SCOPE)
