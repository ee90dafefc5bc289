"""gfl_det: Generalized Focal Loss (GFL) dense object detection.

The core (``gfl_det.models``, ``boxes``, ``priors``, ``assigner``, ``losses``, ``postprocess``)
is plain PyTorch; mmengine glue lives in ``gfl_det.mm`` only.
"""
__version__ = "0.1.0"
