"""Non-finite loss / gradient guard for training loops (plain PyTorch, no mmengine).

A step whose total loss or any gradient is NaN/Inf is skipped (gradients zeroed, no optimizer
step), counted, and logged with the iteration and the offending loss terms (or, when every loss
term is finite, the parameters whose gradient is not). After ``max_consecutive`` skipped steps
in a row training stops with ``NonFiniteLossError`` (the last good checkpoint stays on disk:
nothing is saved from a broken state).

How to use it (``gfl_det.mm.optim.OptimWrapper`` does this under mmengine): after backward,
:meth:`NonFiniteGuard.nonfinite` reduces the total loss and every gradient to ONE boolean on the
device, read once (a single host sync per iteration, which the loss logging pays anyway); only
when it is set does :meth:`NonFiniteGuard.describe` look at the loss terms and gradients one by
one to name the culprit (rare, so its syncs do not matter), and :meth:`NonFiniteGuard.skip`
counts, logs and raises; a good step calls :meth:`NonFiniteGuard.passed`.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ['NonFiniteLossError', 'NonFiniteGuard']


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts and names non-finite steps; raises after ``max_consecutive`` in a row.

    Attributes: ``skipped`` (steps skipped in all), ``consecutive`` (skipped in a row now),
    ``max_consecutive``.
    """

    def __init__(self, max_consecutive: int = 5, logger: logging.Logger | None = None):
        if int(max_consecutive) < 1:
            raise ValueError("max_consecutive must be >= 1")
        self.max_consecutive = int(max_consecutive)
        self.logger = logger or log
        self.skipped = 0
        self.consecutive = 0

    # ------------------------------------------------------------------ device-side checks
    @staticmethod
    def nonfinite(loss: Optional[Tensor] = None, grads: Sequence[Optional[Tensor]] = ()) -> Tensor:
        """A 0-dim bool tensor on the device, True when ``loss`` or any gradient holds a NaN or
        an Inf. No host sync: the caller reads it (``bool(flag)``) once.

        Gradients are reduced with the max-abs norm (``torch._foreach_norm(ord=inf)``): NaN and
        Inf propagate, and unlike the 2-norm it cannot overflow for large but finite values.
        """
        flags = []
        if loss is not None:
            flags.append(~torch.isfinite(loss.detach()).all())
        grads = [g for g in grads if g is not None]
        if grads:
            norms = torch._foreach_norm([g.detach() for g in grads], ord=float('inf'))
            dev = flags[0].device if flags else norms[0].device
            flags.append(~torch.isfinite(torch.stack([n.to(dev) for n in norms])).all())
        if not flags:
            return torch.zeros((), dtype=torch.bool)
        return torch.stack(flags).any() if len(flags) > 1 else flags[0]

    @staticmethod
    def describe(loss_terms: Optional[Mapping[str, Any]] = None,
                 named_params: Optional[Iterable[tuple[str, torch.nn.Parameter]]] = None,
                 max_names: int = 3) -> str:
        """Which loss terms are non-finite (with their values), or else which parameters have a
        non-finite gradient. Reads every term: call it only once a step is known to be bad."""
        bad_terms = []
        for k, v in (loss_terms or {}).items():
            if isinstance(v, Tensor) and not bool(torch.isfinite(v.detach()).all()):
                bad_terms.append(f'{k}={float(v.detach().float().mean()):.4g}')
        if bad_terms:
            return f"non-finite loss term(s) {', '.join(bad_terms)}"
        if named_params is not None:
            bad = [n for n, p in named_params
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            if bad:
                more = f' (+{len(bad) - max_names} more)' if len(bad) > max_names else ''
                return (f'non-finite gradient in {len(bad)} parameter(s): gradient of '
                        f"{', '.join(bad[:max_names])}{more}")
        return 'non-finite loss or gradient'

    # ------------------------------------------------------------------ bookkeeping
    def passed(self) -> None:
        """A good step: the run of consecutive skips is over."""
        self.consecutive = 0

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
                f"({reason}). Training stopped; the last good checkpoint is kept. Lower the learning rate, "
                f"check the data (tools/check_dataset.py) or enable gradient clipping.")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {'skipped': self.skipped, 'consecutive': self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get('skipped', 0))
        self.consecutive = int(state.get('consecutive', 0))
