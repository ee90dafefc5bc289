"""Optimizer wrappers: the gradient norm kept on the device until it is logged (no host sync
per iteration), a guard against non-finite steps, and mixed precision that also runs on the CPU."""
from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from mmengine.logging import MMLogger
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper as _MMOptimWrapper
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from ..guard import NonFiniteGuard
from .registry import OPTIM_WRAPPERS

__all__ = ['OptimWrapper', 'AmpOptimWrapper', 'DeferredScalars']


class DeferredScalars:
    """Mixin for OptimWrapper: keep the gradient norm on the device (mmengine calls
    ``float(grad_norm)`` every iteration, a host sync) until :class:`DeferredRuntimeInfoHook`
    collects it; without that hook it logs immediately, as mmengine does."""

    defer_scalars = False

    def _clip_grad(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g['params']
                  if p.requires_grad and p.grad is not None]
        if not params:
            return
        grad = self.clip_func(params, **self.clip_grad_kwargs)
        if grad is None:  # clip_grad_value_
            return
        if self.defer_scalars:
            self.pending_scalars = getattr(self, 'pending_scalars', {})
            self.pending_scalars[self.grad_name] = grad.detach()
        else:
            self.message_hub.update_scalar(f'train/{self.grad_name}', float(grad))

    def pop_pending_scalars(self) -> dict:
        out, self.pending_scalars = getattr(self, 'pending_scalars', {}), {}
        return out


_DEFAULT_GUARD = dict(max_consecutive=5)


def _max_across_processes(vals: Tensor) -> None:
    """In a distributed run, ``vals`` becomes the elementwise max over the processes (in place),
    so that every rank takes the same guard decision; as it is in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vals, op=dist.ReduceOp.MAX)


class _PendingCheck(NamedTuple):
    """One step's guard verdict, still on the device (see ``OptimWrapper.settle``)."""
    iteration: Optional[int]
    vals: Tensor                 # (2,): non-finite flag, largest |gradient|
    term_names: list
    term_vals: Optional[Tensor]  # (K,) the loss terms, (M, K) for an accumulation window of M
    params: list                 # the parameters whose gradients were checked ...
    maxes: Optional[Tensor]      # (P,) ... and each one's largest |gradient|


@OPTIM_WRAPPERS.register_module(name='OptimWrapper')
class OptimWrapper(DeferredScalars, _MMOptimWrapper):
    """mmengine's ``OptimWrapper`` (grad clipping, accumulation) with the deferred grad norm and
    a guard against non-finite steps.

    ``optim_wrapper = dict(type='OptimWrapper', optimizer=..., nonfinite_guard=dict(
    max_consecutive=5))`` (the default; ``nonfinite_guard=None`` turns it off). After backward
    the total loss and every gradient are reduced on the device to one flag (all-reduced across
    ranks so that every rank decides alike). A non-finite step is *skipped*: no optimizer step,
    gradients zeroed, and the model's buffers (BatchNorm running statistics, which the forward
    pass already updated, possibly with NaN) put back as they were before the forward pass -- so
    the model is exactly as before the step.

    Where the flag is read (``nonfinite_guard=dict(check=...)``): with a fused optimizer
    (``optimizer=dict(type='SGD', ..., fused=True)``, as the configs have it) the flag never
    leaves the device during the step -- the optimizer takes it as ``found_inf`` (its kernel
    changes nothing when it is set, as under a GradScaler) and the running statistics are put
    back with ``torch.where`` -- and :meth:`settle` reads the kept verdicts at the logging
    interval (and before a checkpoint, validation, or the end): no host sync inside a training
    step. The log lines, counts and checkpoints are the same; a stop on ``max_consecutive``
    comes when the verdicts are read (the steps in between change nothing). ``check='auto'``
    (default) does this when it can; ``'interval'`` insists (an error for an optimizer that is
    not fused); ``'step'`` reads the flag every iteration (one host sync per step), as it must
    for an optimizer that is not fused. Under float16 AMP the same holds, the GradScaler's
    overflow check included (:class:`AmpOptimWrapper`). The very first step is always read on the
    host (torch's fused SGD leaves its momentum buffers uninitialised on a skipped first step).

    A skipped step is counted (``train/nonfinite_skipped`` in the MessageHub and the log, from
    the first skip on; the guard's state is saved in checkpoints with the optimizer state) and
    logged with the iteration (1-based, as mmengine's logs) and the loss term(s) that are non-finite, or the
    parameters whose gradient is. :class:`DeferredRuntimeInfoHook` leaves a skipped step's
    losses out of the logged (smoothed) values, so one NaN does not turn the next 50 log lines
    into NaN. ``max_consecutive`` skipped steps in a row raise
    :class:`gfl_det.guard.NonFiniteLossError` (:class:`GFLRunner` adds the last good checkpoint
    to the message). The guard also records each good step's largest absolute gradient, so that
    it can tell a diverged state (:meth:`gfl_det.guard.NonFiniteGuard.dirty_reason`), which
    :class:`gfl_det.mm.hooks.CheckpointHook` never saves. ``nonfinite_guard`` takes the guard's
    keywords (``max_consecutive``, ``diverge_factor``, ``window``, ``min_history``) and ``check``. The lr
    schedule moves on through a skipped iteration, as it does for any iteration.

    With gradient accumulation (``accumulative_counts > 1``) a bad micro-batch also discards the
    gradients accumulated before it in its window. Checked on the device, the whole window is
    one verdict -- every micro-batch's loss, and the accumulated gradients at the window's last
    one -- counted once, at that last iteration, and a bad window's step is skipped. For mixed
    precision see :class:`AmpOptimWrapper`.
    """

    _guard_grads = True  # AmpOptimWrapper: False when its GradScaler checks the gradients
    step_skipped = False  # the last update_params was skipped by the guard
    _grad_max: Optional[float] = None  # the last checked step's largest |gradient|

    def __init__(self, *args: Any, nonfinite_guard: Union[dict, bool, None] = _DEFAULT_GUARD,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        check = 'auto'
        if nonfinite_guard is None or nonfinite_guard is False:
            self.guard: Optional[NonFiniteGuard] = None
        else:
            cfg = {} if nonfinite_guard is True else dict(nonfinite_guard)
            cfg.pop('type', None)
            check = cfg.pop('check', 'auto')
            self.guard = NonFiniteGuard(logger=MMLogger.get_current_instance(), **cfg)
        if check not in ('auto', 'step', 'interval'):
            raise ValueError(f"nonfinite_guard check must be 'auto', 'step' or 'interval', got "
                             f'{check!r}')
        fused = self._fused_optimizer()
        if check == 'interval' and not fused:
            raise ValueError(
                "nonfinite_guard=dict(check='interval') skips bad steps on the device, which needs "
                'an optimizer that takes a found_inf flag: add fused=True to optim_wrapper.optimizer '
                f'(SGD, Adam, AdamW; this one is {type(self.optimizer).__name__} without it), or '
                "use check='step'")
        self._check_on_device = check != 'step' and fused
        if self.guard is not None and check == 'auto' and not fused:
            MMLogger.get_current_instance().info(
                'non-finite guard: the optimizer is not fused, so each iteration reads one flag on '
                'the host (a GPU sync); optim_wrapper.optimizer fused=True checks on the device')
        self._guard_model: Optional[torch.nn.Module] = None
        self._guard_bufs: list = []
        self._guard_backup: list = []
        self._pending_checks: list[_PendingCheck] = []
        self._window_bad: Optional[Tensor] = None  # a non-finite loss in the accumulation window
        self._window_terms: list[Tensor] = []  # the window's micro-batches' loss terms
        self.last_step_bad: Optional[Tensor] = None  # device-side verdict of the last call

    # ------------------------------------------------------------------ non-finite guard
    @contextlib.contextmanager
    def optim_context(self, model: torch.nn.Module):
        if self.guard is not None:
            self._guard_snapshot(model)
        with super().optim_context(model):
            yield

    def _guard_snapshot(self, model: torch.nn.Module) -> None:
        """Remember the model (to name loss terms / parameters) and copy its buffers, which the
        coming forward pass changes (BatchNorm running stats), into a reused backup. Checked on
        the device, where they are put back one by one, only the running statistics of the
        normalisation layers in training mode (an eval-mode BatchNorm, e.g. ``norm_eval``, and
        constant buffers change nothing)."""
        m = model.module if is_model_wrapper(model) else model
        self._guard_model = m
        if self._check_on_device:
            bufs = [b for mod in m.modules()
                    if isinstance(mod, _NormBase) and mod.training and mod.track_running_stats
                    for b in mod.buffers(recurse=False)]
        else:
            bufs = list(m.buffers())
        with torch.no_grad():
            if (len(bufs) != len(self._guard_bufs)
                    or any(a is not b for a, b in zip(bufs, self._guard_bufs))):
                self._guard_bufs = bufs
                self._guard_backup = [b.detach().clone() for b in bufs]
            elif bufs:
                torch._foreach_copy_(self._guard_backup, bufs)

    def _step_nonfinite(self, loss: Tensor) -> bool:
        """Whether this step's loss or gradients are non-finite; the largest absolute gradient
        goes to ``self._grad_max`` (None when the gradients are not checked). One host sync."""
        grads = ([p.grad for g in self.optimizer.param_groups for p in g['params']
                  if p.grad is not None] if self._guard_grads else [])
        vals = NonFiniteGuard.check(loss, grads)
        _max_across_processes(vals)
        flag, gmax = vals.tolist()  # the one host sync
        self._grad_max = gmax if grads else None
        return flag > 0

    def _skip_step(self, zero_kwargs: dict) -> None:
        m = self._guard_model
        if m is not None:
            named = list(m.named_parameters())
            terms = getattr(m, 'last_loss_terms', None)
        else:
            named = [(f'param_groups[{i}][{j}]', p) for i, g in enumerate(self.optimizer.param_groups)
                     for j, p in enumerate(g['params'])]
            terms = None
        reason = NonFiniteGuard.describe(terms, named)
        self.zero_grad(**zero_kwargs)
        if m is not None and self._guard_bufs:
            with torch.no_grad():
                torch._foreach_copy_(self._guard_bufs, self._guard_backup)
        it = self.message_hub.get_info('iter')
        try:
            self.guard.skip(None if it is None else int(it) + 1, reason)
        finally:
            self.message_hub.update_scalar('train/nonfinite_skipped', self.guard.skipped)

    # ------------------------------------------------------------------ checked on the device
    def _fused_optimizer(self) -> bool:
        """The optimizer takes ``found_inf``: fused, in every parameter group (a checkpoint of
        an optimizer that was not fused brings ``fused=False`` back into the groups)."""
        return (bool(getattr(self.optimizer, '_step_supports_amp_scaling', False))
                and all(g.get('fused') for g in self.optimizer.param_groups))

    def _can_check_on_device(self) -> bool:
        """The step can be skipped on the device: a fused optimizer (it takes ``found_inf``, as
        under a GradScaler), and the optimizer's state made (torch's fused SGD allocates its
        momentum buffers uninitialised on the first step, so a skipped first step would leave
        garbage: that one is read on the host)."""
        if not (self._check_on_device and self._fused_optimizer()):
            return False
        state = self.optimizer.state
        return all(p in state and state[p] for g in self.optimizer.param_groups
                   for p in g['params'] if p.grad is not None)

    def _update_checked_on_device(self, loss: Tensor, step_kwargs: dict, zero_kwargs: dict) -> None:
        """The guard without a host sync: the verdict stays on the device. The optimizer gets it
        as ``found_inf`` (its fused kernel leaves weights and momentum as they were when it is
        1); the buffers the forward pass changed are put back with ``torch.where``; the verdict,
        the largest gradient, the loss terms and each gradient's largest value are kept until
        :meth:`settle` reads them all at once (the logging interval, a checkpoint, validation)."""
        terms = getattr(self._guard_model, 'last_loss_terms', None) or {}
        names = [k for k, v in terms.items() if isinstance(v, Tensor)]
        if names:
            self._window_terms.append(torch.stack([terms[k].detach().float().mean() for k in names]))
        if not self.should_update():  # inside an accumulation window: the gradients are not whole
            loss_bad = ~torch.isfinite(loss.detach()).all()
            self._window_bad = loss_bad if self._window_bad is None else self._window_bad | loss_bad
            self._restore_buffers_where(loss_bad)  # what this micro-batch's forward pass changed
            self.last_step_bad = loss_bad
            return
        # the window's last micro-batch: its losses and the accumulated gradients, one verdict
        params = [p for g in self.optimizer.param_groups for p in g['params'] if p.grad is not None]
        if not self._guard_grads:  # float16: the GradScaler checks the gradients, the guard the loss
            params = []
        maxes = NonFiniteGuard.grad_maxes([p.grad for p in params])
        if self._window_bad is not None:  # an earlier micro-batch of the window had a bad loss
            loss = torch.where(self._window_bad, float('nan'), loss.detach())
        vals = NonFiniteGuard.check(loss, maxes=maxes)
        _max_across_processes(vals)
        bad = vals[0] > 0
        self._restore_buffers_where(bad)
        term_vals = (None if not self._window_terms else self._window_terms[0] if len(self._window_terms) == 1
                     else torch.stack(self._window_terms))  # (K,) or (M, K)
        it = self.message_hub.get_info('iter')
        self._pending_checks.append(_PendingCheck(None if it is None else int(it) + 1, vals,
                                                  names, term_vals, params, maxes))
        self.last_step_bad = bad
        self._window_bad, self._window_terms = None, []
        self._step_unless(bad, step_kwargs)
        self.zero_grad(**zero_kwargs)

    def _restore_buffers_where(self, bad: Tensor) -> None:
        """Put back the buffers the last forward pass changed where ``bad`` (on the device)."""
        with torch.no_grad():
            for buf, backup in zip(self._guard_bufs, self._guard_backup):
                buf.copy_(torch.where(bad, backup, buf))

    def _step_unless(self, bad: Tensor, step_kwargs: dict) -> None:
        """The optimizer step, which changes nothing where ``bad`` (a 0-dim bool on the device)."""
        self.optimizer.found_inf = bad.float()
        try:
            self.step(**step_kwargs)
        finally:
            del self.optimizer.found_inf

    def settle(self) -> None:
        """Read the verdicts kept on the device (one host sync for all) and pass them to the
        guard in order: a bad step is counted and logged with its iteration and its culprit
        (raising :class:`NonFiniteLossError` at the ``max_consecutive``-th in a row), a good one
        gives its largest gradient. Called at the logging interval and before anything judges
        or saves the guard's state."""
        pending, self._pending_checks = self._pending_checks, []
        if not pending or self.guard is None:
            return
        host = torch.stack([c.vals for c in pending]).tolist()  # the one host sync
        for check, (flag, gmax) in zip(pending, host):
            if flag <= 0:
                self.guard.passed(gmax if check.params else None, check.iteration)
                continue
            bad_terms = []
            if check.term_vals is not None:  # (M, K): the window's M micro-batches
                rows = check.term_vals.reshape(-1, len(check.term_names)).tolist()
                for k, column in zip(check.term_names, zip(*rows)):
                    v = next((v for v in column if not math.isfinite(v)), None)
                    if v is not None:
                        bad_terms.append((k, v))
            names = {id(p): n for n, p in self._guard_model.named_parameters()} \
                if self._guard_model is not None else {}
            bad_params = [] if check.maxes is None else [
                names.get(id(p), f'parameter {i}') for i, (p, v) in
                enumerate(zip(check.params, check.maxes.tolist())) if not math.isfinite(v)]
            try:
                self.guard.skip(check.iteration, NonFiniteGuard.explain(bad_terms, bad_params))
            finally:
                self.message_hub.update_scalar('train/nonfinite_skipped', self.guard.skipped)

    def update_params(self, loss: Tensor, step_kwargs: Optional[dict] = None,
                      zero_kwargs: Optional[dict] = None) -> None:
        if self.guard is None:
            return super().update_params(loss, step_kwargs, zero_kwargs)
        loss = self.scale_loss(loss)
        self.backward(loss)
        self.last_step_bad = None
        if self._can_check_on_device():
            self.step_skipped = False  # not known on the host: see last_step_bad
            return self._update_checked_on_device(loss, step_kwargs or {}, zero_kwargs or {})
        self.settle()  # a verdict read now goes after the ones still on the device
        self.step_skipped = self._step_nonfinite(loss)
        if self.step_skipped:
            self._skip_step(zero_kwargs or {})
            return
        it = self.message_hub.get_info('iter')
        self.guard.passed(self._grad_max, None if it is None else int(it) + 1)
        if self.should_update():
            self.step(**(step_kwargs or {}))
            self.zero_grad(**(zero_kwargs or {}))

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.guard is not None:
            self.settle()
            state['nonfinite_guard'] = self.guard.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        guard = state_dict.pop('nonfinite_guard', None)
        if guard and self.guard is not None:
            self.guard.load_state_dict(guard)
        super().load_state_dict(state_dict)


@OPTIM_WRAPPERS.register_module(name='AmpOptimWrapper')
class AmpOptimWrapper(OptimWrapper):
    """Mixed precision that also runs on the CPU (mmengine's refuses to be built without a GPU).

    Non-finite steps (read on the device with a fused optimizer, as :class:`OptimWrapper` says;
    the GradScaler then skips inside the fused kernel): with float16 the GradScaler owns the
    gradient check -- a step whose (scaled) gradients overflow is skipped by ``GradScaler.step`` and the scale is lowered, the
    normal dynamic loss-scaling mechanism; the guard of :class:`OptimWrapper` does not count
    those (no double counting, no stop) and checks only the loss itself (a NaN/Inf loss is not
    a scaling problem: it is skipped and counted as without AMP, and the scaler is left as it
    was). With bfloat16 (no loss scaling) the guard checks loss and gradients as without AMP.
    The scaler's state (scale, growth tracker) is saved in checkpoints and restored on resume.

    Args:
        dtype: ``'float16'``, ``'bfloat16'`` or None/``'auto'``: float16 on CUDA, bfloat16 on the
            CPU (the CPU autocast type).
        loss_scale: ``'dynamic'``, a float (static scale) or GradScaler kwargs; used only with
            float16 (bfloat16 has float32's range and needs no loss scaling).
    """

    def __init__(self, dtype: Union[str, torch.dtype, None] = None,
                 loss_scale: Union[str, float, dict] = 'dynamic', **kwargs: Any):
        super().__init__(**kwargs)
        self.device_type = 'cuda' if torch.cuda.is_available() else 'cpu'
        if dtype in (None, 'auto'):
            dtype = torch.float16 if self.device_type == 'cuda' else torch.bfloat16
        elif isinstance(dtype, str):
            if dtype not in ('float16', 'bfloat16'):
                raise ValueError(f"AmpOptimWrapper dtype must be 'float16' or 'bfloat16', got {dtype!r}")
            dtype = getattr(torch, dtype)
        self.cast_dtype = dtype
        self._scale_update_param = None
        scaler_kwargs: dict = {}
        if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
            self._scale_update_param = float(loss_scale)
            scaler_kwargs = dict(init_scale=float(loss_scale))
        elif isinstance(loss_scale, dict):
            scaler_kwargs = dict(loss_scale)
        elif loss_scale != 'dynamic':
            raise TypeError(f"loss_scale must be 'dynamic', a float or a dict, got {loss_scale!r}")
        self.loss_scaler = torch.amp.GradScaler(self.device_type,
                                                enabled=dtype == torch.float16, **scaler_kwargs)
        self._guard_grads = not self.loss_scaler.is_enabled()

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        self.loss_scaler.scale(loss).backward(**kwargs)
        self._inner_count += 1

    def _step_unless(self, bad: Tensor, step_kwargs: dict) -> None:
        """float16 checked on the device: a bad loss makes the gradients non-finite, so the
        GradScaler sees an overflow and skips the step inside the fused kernel (no sync); its
        scale and growth tracker, which that overflow lowered, are then put back -- a NaN loss is
        not a scaling problem. (bfloat16: no scaler, as without AMP.)"""
        if not self.loss_scaler.is_enabled():
            return super()._step_unless(bad, step_kwargs)
        grads = [p.grad for g in self.optimizer.param_groups for p in g['params'] if p.grad is not None]
        if grads:  # x inf (0 x inf = NaN: non-finite too) or x 1; a tensor factor: no host read
            torch._foreach_mul_(grads, torch.where(bad, float('inf'), 1.0).to(grads[0].dtype))
        scaler = self.loss_scaler
        saved = (scaler._scale.clone(), scaler._growth_tracker.clone())  # private, as set by scale()
        self.step(**step_kwargs)
        with torch.no_grad():
            scaler._scale.copy_(torch.where(bad, saved[0], scaler._scale))
            scaler._growth_tracker.copy_(torch.where(bad, saved[1], scaler._growth_tracker))

    def step(self, **kwargs: Any) -> None:
        if self.clip_grad_kwargs:
            self.loss_scaler.unscale_(self.optimizer)
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update(self._scale_update_param)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state['loss_scaler'] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        scaler = state_dict.pop('loss_scaler', None)
        if scaler:
            self.loss_scaler.load_state_dict(scaler)
        super().load_state_dict(state_dict)

    @contextlib.contextmanager
    def optim_context(self, model: torch.nn.Module):
        with super().optim_context(model), \
                torch.autocast(device_type=self.device_type, dtype=self.cast_dtype):
            yield
