"""Non-finite loss / gradient guard for training loops (plain PyTorch, no mmengine).

A step whose total loss or any gradient is NaN/Inf is skipped (gradients zeroed, no optimizer
step), counted, and logged with the iteration and the offending loss terms (or, when every loss
term is finite, the parameters whose gradient is not). After ``max_consecutive`` skipped steps
in a row training stops with ``NonFiniteLossError`` (the last good checkpoint stays on disk:
nothing is saved from a broken state).

The guard also says whether the training state is *clean* enough to be saved
(:meth:`NonFiniteGuard.dirty_reason`; ``gfl_det.mm.CheckpointHook`` asks before every save and
writes nothing -- no epoch checkpoint, no new best -- while it is not). Clean means all of:

* no non-finite streak is open (the last step was not skipped);
* the last step's largest absolute gradient is at most ``diverge_factor`` (1000) times the
  median of the previous ``window`` (100) steps' (judged once ``min_history`` (20) are known);
* the largest absolute value of the model's state (weights and BatchNorm statistics, a
  running variance taken as its standard deviation) is at most ``diverge_factor`` times
  max(1, its value when training started).

How to use it (``gfl_det.mm.optim.OptimWrapper`` does this under mmengine): after backward,
:meth:`NonFiniteGuard.check` reduces the total loss and every gradient to two numbers on the
device (non-finite flag, largest absolute gradient), read once (a single host sync per
iteration -- or none: ``gfl_det.mm.OptimWrapper`` with a fused optimizer keeps the flags on
the device, skips a bad step there, and reads them at the logging interval); only when the
flag is set does :meth:`NonFiniteGuard.describe` look at the loss terms and gradients one by
one to name the culprit (rare, so its syncs do not matter), and :meth:`NonFiniteGuard.skip` counts, logs and
raises; a good step calls :meth:`NonFiniteGuard.passed` with its largest gradient.
"""
from __future__ import annotations

import logging
import statistics
from collections import deque
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ['NonFiniteLossError', 'NonFiniteGuard']


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts and names non-finite steps; raises after ``max_consecutive`` in a row; tells
    whether the state is clean enough to save (see the module docstring).

    Attributes: ``skipped`` (steps skipped in all), ``consecutive`` (skipped in a row now),
    ``max_consecutive``, ``diverge_factor``, ``window``, ``min_history``.
    """

    def __init__(self, max_consecutive: int = 5, logger: logging.Logger | None = None,
                 diverge_factor: float = 1000.0, window: int = 100, min_history: int = 20):
        if int(max_consecutive) < 1:
            raise ValueError("max_consecutive must be >= 1")
        if not float(diverge_factor) > 1 or int(window) < 1 or int(min_history) < 1:
            raise ValueError("diverge_factor must be > 1, window and min_history >= 1")
        self.max_consecutive = int(max_consecutive)
        self.diverge_factor = float(diverge_factor)
        self.window, self.min_history = int(window), int(min_history)
        self.logger = logger or log
        self.skipped = 0
        self.consecutive = 0
        self.grad_history: deque = deque(maxlen=self.window)  # largest |grad| of recent steps
        self.last_grad: Optional[float] = None
        self.spike: Optional[str] = None     # why the last step's gradient counts as diverged
        self.weight_ref: Optional[float] = None

    # ------------------------------------------------------------------ device-side checks
    @staticmethod
    def max_abs(tensors: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
        """The largest absolute value over ``tensors`` (0-dim float32 on their device; NaN if
        any holds a NaN, inf if any an Inf), or None for no tensors. No host sync.

        The max-abs norm (``torch._foreach_norm(ord=inf)``): NaN and Inf propagate, and unlike
        the 2-norm it cannot overflow for large but finite values."""
        maxes = NonFiniteGuard.grad_maxes(tensors)
        return None if maxes is None else maxes.max()

    @staticmethod
    def grad_maxes(tensors: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
        """``(T,)`` float32: each tensor's largest absolute value (NaN / inf as :meth:`max_abs`),
        on the first tensor's device, or None for no tensors. No host sync."""
        tensors = [t.detach() if t.requires_grad else t for t in tensors if t is not None]
        if not tensors:
            return None
        norms = torch._foreach_norm(tensors, ord=float('inf'))
        dev = norms[0].device
        return torch.stack([n.to(dev, torch.float32) for n in norms])

    @staticmethod
    def check(loss: Optional[Tensor] = None, grads: Sequence[Optional[Tensor]] = (),
              maxes: Optional[Tensor] = None) -> Tensor:
        """``(2,)`` float32 on the device: [1.0 if ``loss`` or any gradient holds a NaN/Inf else
        0.0, the largest absolute gradient (NaN without gradients)]. No host sync: the caller
        reads both at once (``.tolist()``). ``maxes``: the gradients' :meth:`grad_maxes`, when
        the caller has them already (then ``grads`` is not read)."""
        if maxes is None:
            maxes = NonFiniteGuard.grad_maxes(grads)
        gmax = None if maxes is None else maxes.max()
        dev = loss.device if loss is not None else (gmax.device if gmax is not None else 'cpu')
        flag = torch.zeros((), dtype=torch.bool, device=dev)
        if loss is not None:
            flag = flag | ~torch.isfinite(loss.detach()).all()
        if gmax is None:
            gmax = torch.full((), float('nan'), device=dev)
        else:
            gmax = gmax.to(dev)
            flag = flag | ~torch.isfinite(gmax)
        return torch.stack([flag.float(), gmax])

    @staticmethod
    def nonfinite(loss: Optional[Tensor] = None, grads: Sequence[Optional[Tensor]] = ()) -> Tensor:
        """A 0-dim bool tensor on the device, True when ``loss`` or any gradient holds a NaN or
        an Inf (:meth:`check`'s flag). No host sync."""
        return NonFiniteGuard.check(loss, grads)[0] > 0

    @staticmethod
    def describe(loss_terms: Optional[Mapping[str, Any]] = None,
                 named_params: Optional[Iterable[tuple[str, torch.nn.Parameter]]] = None,
                 max_names: int = 3) -> str:
        """Which loss terms are non-finite (with their values), or else which parameters have a
        non-finite gradient. Reads every term: call it only once a step is known to be bad."""
        bad_terms = []
        for k, v in (loss_terms or {}).items():
            if isinstance(v, Tensor) and not bool(torch.isfinite(v.detach()).all()):
                bad_terms.append((k, float(v.detach().float().mean())))
        bad = None
        if not bad_terms and named_params is not None:
            bad = [n for n, p in named_params
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        return NonFiniteGuard.explain(bad_terms, bad, max_names)

    @staticmethod
    def explain(bad_terms: Sequence[tuple[str, float]] = (), bad_params: Optional[Sequence[str]] = None,
                max_names: int = 3) -> str:
        """The reason :meth:`describe` gives, from the non-finite loss terms ``(name, value)``
        and the names of the parameters whose gradient is non-finite (for checks read later)."""
        if bad_terms:
            return f"non-finite loss term(s) {', '.join(f'{k}={v:.4g}' for k, v in bad_terms)}"
        if bad_params:
            bad = list(bad_params)
            more = f' (+{len(bad) - max_names} more)' if len(bad) > max_names else ''
            return (f'non-finite gradient in {len(bad)} parameter(s): gradient of '
                    f"{', '.join(bad[:max_names])}{more}")
        return 'non-finite loss or gradient'

    # ------------------------------------------------------------------ bookkeeping
    def passed(self, grad_max: Optional[float] = None, iteration: Optional[int] = None) -> None:
        """A good (finite) step: the run of consecutive skips is over. ``grad_max``: its
        largest absolute gradient (None when not measured, e.g. under float16 loss scaling)."""
        self.consecutive = 0
        self.spike = None
        if grad_max is None or grad_max != grad_max:  # not measured / NaN
            return
        hist = self.grad_history
        if len(hist) >= self.min_history:
            median = statistics.median(hist)
            if grad_max > self.diverge_factor * median:
                where = 'the last step' if iteration is None else f'iteration {iteration}'
                self.spike = (f'{where}\'s largest |gradient| {grad_max:.4g} is over '
                              f'{self.diverge_factor:g}x the median {median:.4g} of the '
                              f'{len(hist)} steps before it')
                self.logger.warning(f'{self.spike}: the gradient has diverged; no checkpoint is '
                                    'written in this state')
        hist.append(float(grad_max))
        self.last_grad = float(grad_max)

    def skip(self, iteration: Optional[int], reason: str, epoch: Optional[int] = None) -> None:
        """Count one skipped step, log it, and raise :class:`NonFiniteLossError` when it is the
        ``max_consecutive``-th in a row."""
        self.skipped += 1
        self.consecutive += 1
        where = 'iteration ?' if iteration is None else f'iteration {iteration}'
        if epoch is not None:
            where += f' (epoch {epoch})'
        # formatted here, not by logging: mmengine's logger drops a WARNING whose format string
        # it has seen before (FilterDuplicateWarning), which would hide every skip but the first
        self.logger.warning(f"{where}: {reason}; step skipped: no optimizer step, gradients "
                            f"zeroed ({self.skipped} skipped so far, {self.consecutive} in a row, "
                            f"limit {self.max_consecutive})")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{where}: {self.consecutive} consecutive steps with non-finite loss or gradients "
                f"({reason}). Training stopped: lower the learning rate, check the data "
                f"(tools/check_dataset.py) or enable gradient clipping.")

    def dirty_reason(self, weight_max: float) -> Optional[str]:
        """None when the state may be saved, else why not (see the module docstring).
        ``weight_max``: the largest absolute value of the model's state (weights, BatchNorm
        statistics) now; the first call (training starts) makes it the reference unless one was
        restored from a checkpoint."""
        if self.weight_ref is None:
            self.weight_ref = float(weight_max)
        if self.consecutive:
            return (f'a non-finite streak is open ({self.consecutive} step(s) in a row skipped up '
                    'to now)')
        if self.spike:
            return self.spike
        bound = self.diverge_factor * max(1.0, self.weight_ref)
        if not weight_max <= bound:
            return (f'the weights have diverged: the largest |value| of the model\'s state '
                    f'{weight_max:.4g} is over '
                    f'{self.diverge_factor:g}x max(1, {self.weight_ref:.4g}), its value when '
                    'training started')
        return None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {'skipped': self.skipped, 'consecutive': self.consecutive,
                'grad_history': list(self.grad_history), 'spike': self.spike,
                'weight_ref': self.weight_ref}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get('skipped', 0))
        self.consecutive = int(state.get('consecutive', 0))
        self.grad_history = deque((float(v) for v in state.get('grad_history', ())),
                                  maxlen=self.window)
        self.last_grad = self.grad_history[-1] if self.grad_history else None
        self.spike = state.get('spike')
        ref = state.get('weight_ref')
        self.weight_ref = None if ref is None else float(ref)
