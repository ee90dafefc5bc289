"""Non-finite loss / gradient guard for training loops (plain PyTorch, no mmengine).

A step whose total loss or any gradient is NaN/Inf is skipped (gradients zeroed, no optimizer
step), counted, and logged with the iteration and the offending loss terms. After
``max_consecutive`` skipped steps in a row training stops with ``NonFiniteLossError`` (the
last good checkpoint stays on disk: nothing is saved from a broken state).

Cost: the check reduces every loss term and gradient to one boolean on the device and reads
it once per iteration (a single host sync, which the loss logging already pays).
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    def __init__(self, max_consecutive: int = 5, logger: logging.Logger | None = None):
        if max_consecutive < 1:
            raise ValueError("max_consecutive must be >= 1")
        self.max_consecutive = max_consecutive
        self.logger = logger or log
        self.skipped = 0
        self.consecutive = 0

    def losses_finite(self, losses: Mapping[str, Tensor]) -> tuple[bool, list[str]]:
        """One device reduction and one read; names the bad terms only when something is wrong."""
        terms = {k: v for k, v in losses.items() if isinstance(v, Tensor)}
        if not terms:
            return True, []
        ok = bool(torch.stack([torch.isfinite(v.detach()).all() for v in terms.values()]).all())
        bad = [] if ok else [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
        return ok, bad

    @staticmethod
    def grads_finite(params: Iterable[torch.nn.Parameter]) -> tuple[bool, list[str] | None]:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True, None
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack(norms)).all()), None

    def step_ok(self, iteration: int, losses: Mapping[str, Tensor] | None = None,
                named_params: Iterable[tuple[str, torch.nn.Parameter]] | None = None) -> bool:
        """Check the losses (before backward) or the gradients (after); log, count, raise.

        Returns True when the step may go on. Call with ``losses`` before backward and again with
        ``named_params`` after backward; each failing call counts one skipped step, and only a
        passing gradient check (the end of a good step) resets the consecutive count.
        """
        reason = None
        if losses is not None:
            ok, bad = self.losses_finite(losses)
            if not ok:
                vals = ", ".join(f"{k}={float(losses[k].detach().float().mean()):.4g}" for k in bad)
                reason = f"non-finite loss term(s) {vals}"
        if reason is None and named_params is not None:
            named = [(n, p) for n, p in named_params if p.grad is not None]
            ok, _ = self.grads_finite(p for _, p in named)
            if not ok:
                bad = [n for n, p in named if not bool(torch.isfinite(p.grad).all())]
                reason = f"non-finite gradient in {len(bad)} parameter(s), e.g. {', '.join(bad[:3])}"
        if reason is None:
            if named_params is not None:  # the step is complete only once its gradients passed
                self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        self.logger.warning("iteration %d: %s; step skipped (%d skipped so far, %d in a row, limit %d)",
                            iteration, reason, self.skipped, self.consecutive, self.max_consecutive)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"iteration {iteration}: {self.consecutive} consecutive steps with non-finite loss or gradients "
                f"({reason}). Training stopped; the last good checkpoint is kept. Lower the learning rate, "
                f"check the data (tools/check_dataset.py) or enable gradient clipping.")
        return False
