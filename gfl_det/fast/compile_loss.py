"""``model.fast.compile_loss``: the criterion's GFL terms as one ``torch.compile`` graph, compiled
once for every image shape.

Legend: B images, G gt boxes per image (padded), C classes, R = reg_max, H_l x W_l level l's map.

What is compiled is :meth:`gfl_det.criterion.GFLCriterion.gfl_losses` -- priors, ATSS, the
per-prior targets, QFL / GIoU / DFL and the normalisers, forward and backward. It is written
dense over (B, A) with masks (no ``nonzero``, no ``.item()``, host data only from the metas), so
dynamo captures it whole; on a GPU inductor then runs it as a few dozen fused kernels instead of
~500 aten ops (MMDetection's head loss: ~1,400 kernels, mostly launch time). Extra terms (the
embedding loss) stay eager: they read the host to size their rows.

One compilation serves every batch shape. Eager code caches the priors per shape; here they are
built inside the graph from the maps' symbolic sizes (``gfl_det/priors.py``), and the call
marks what really varies:

* dynamic: each level's H_l and W_l, G, and the metas' pad shapes (ints: dynamic on their own);
* static: B, C, the 4 (R + 1) regression channels, the 4 box coordinates -- a model constant or
  the batch size, which a training run does not change;
* no "duck sizing": torch would give two sizes that happen to be equal at the first call (a
  level's W_l = 80 = C, or H_l = W_l on square images) one symbol, and recompile when they
  differ later; each size gets its own symbol instead.

``fused_qfl`` gives way to the readable QFL inside the graph (its chunk loop is sized by the maps
and would pin the shape; inductor fuses the readable form itself). A distributed run's
all-reduce of the normalisers is traced into the same graph (tests/test_criterion.py, gloo).

Without these, every new padded image shape recompiled (16-20 s each on the CPU for R50's loss),
and after 8 shapes dynamo gave up and ran eager -- a real pipeline has dozens of pad shapes.
Parity and the one-compilation guarantee: tests/test_fast.py.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from ..structures import HeadOutputs, Targets

__all__ = ['compiled_gfl_losses', 'mark_shapes']

_COMPILED: dict[tuple, Callable] = {}


def mark_shapes(outputs: HeadOutputs, targets: Targets) -> None:
    """Tell dynamo which dims are fixed for a run (see the module docstring); the level sizes
    and G stay dynamic (``dynamic=True``)."""
    for t in list(outputs.cls) + list(outputs.reg):
        torch._dynamo.mark_static(t, 0)  # B
        torch._dynamo.mark_static(t, 1)  # C, or 4 (R + 1)
    for t in (targets.boxes, targets.labels, targets.valid):
        torch._dynamo.mark_static(t, 0)  # B
    torch._dynamo.mark_static(targets.boxes, 2)  # the 4 coordinates


def _no_duck_sizing():
    try:
        from torch.fx.experimental import _config
    except ImportError:  # pragma: no cover - older torch: duck sizing stays (a few more compiles)
        return contextlib.nullcontext()
    return _config.patch(use_duck_shape=False)


def compiled_gfl_losses(gfl_losses: Callable, backend: str = 'inductor') -> Callable:
    """``fn(criterion, outputs, targets, metas)`` = ``gfl_losses(criterion, outputs, targets, metas)``
    (the unbound :meth:`GFLCriterion.gfl_losses`) through ``torch.compile(dynamic=True,
    backend=backend)``; one compiled function per (method, backend) for the process (dynamo's
    cache is per code object anyway)."""
    key = (gfl_losses, backend)
    fn = _COMPILED.get(key)
    if fn is None:
        compiled = torch.compile(gfl_losses, dynamic=True, backend=backend)

        def fn(criterion, outputs: HeadOutputs, targets: Targets, metas: Sequence[dict]):
            mark_shapes(outputs, targets)
            with _no_duck_sizing():
                return compiled(criterion, outputs, targets, metas)
        fn = _COMPILED[key] = fn
    return fn
