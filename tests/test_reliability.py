"""Non-finite guard, and bounded memory with many gt boxes."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gfl_det.guard import NonFiniteGuard, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


def _train(guard, nan_at_loss=(), nan_at_grad=(), iters=8):
    """A plain training loop with the guard used as gfl_det.mm.optim.OptimWrapper uses it: one
    device-side flag over loss and gradients after backward; a bad step is described, counted
    and skipped, a good one resets the run of skips."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    steps = 0
    for it in range(iters):
        losses = {"loss_a": ((model(x) - y) ** 2).mean(), "loss_b": model.weight.abs().sum() * 0.01}
        if it in nan_at_loss:
            losses["loss_b"] = losses["loss_b"] * float("nan")
        opt.zero_grad()
        loss = sum(losses.values())
        loss.backward()
        if it in nan_at_grad:
            model.bias.grad.fill_(float("inf"))
        if bool(NonFiniteGuard.nonfinite(loss, [p.grad for p in model.parameters()])):
            guard.skip(it, NonFiniteGuard.describe(losses, model.named_parameters()))
            continue
        guard.passed()
        opt.step()
        steps += 1
    return model, steps


def test_nan_loss_is_skipped_counted_and_named(caplog):
    guard = NonFiniteGuard(max_consecutive=3)
    with caplog.at_level(logging.WARNING):
        model, steps = _train(guard, nan_at_loss={2, 5})
    assert guard.skipped == 2 and steps == 6
    assert "iteration 2: non-finite loss term(s) loss_b=nan" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_gradient_is_skipped_and_named(caplog):
    guard = NonFiniteGuard(max_consecutive=3)
    with caplog.at_level(logging.WARNING):
        model, steps = _train(guard, nan_at_grad={4})
    assert guard.skipped == 1 and steps == 7
    assert "iteration 4: non-finite gradient in 1 parameter(s): gradient of bias" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_non_finite_steps_stop_training():
    guard = NonFiniteGuard(max_consecutive=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        _train(guard, nan_at_loss={1, 2}, nan_at_grad={3})
    # non-consecutive failures reset the run length
    guard = NonFiniteGuard(max_consecutive=2)
    _train(guard, nan_at_loss={1, 3, 5})
    assert guard.skipped == 3


def test_thousand_gt_boxes_memory_bounded():
    """The R50 head loss (1 x 512 x 768) with 1,000 gt boxes needs < 400 MB more than with 10.

    ATSS keeps K = 45 candidate slots per gt, never an (A x G) matrix, so memory grows by about
    (G x 45 x (C + 4 (R + 1))) floats. Measured here: +~100 MB for a full training step.
    """
    cfg = ROOT / "tests" / "_r50_model_cfg.py"
    peaks = {}
    for g in (10, 1000):
        out = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), str(cfg), "--task", "loss",
                              "--batch", "1", "--shape", "512", "768", "--num-gt", str(g), "--iters", "1", "--warmup", "1", "--json",
                              "--threads", "2"], check=True, capture_output=True, text=True).stdout
        peaks[g] = json.loads(out.strip().splitlines()[-1])["peak_mem_mb"]
    assert peaks[1000] - peaks[10] < 400, peaks
