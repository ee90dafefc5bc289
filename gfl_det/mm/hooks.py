"""gfl_det's hooks: losses logged with one host sync per interval, pictures of the predictions,
validation kept out of the random streams, a report of bad input, and checkpoints saved only
from a clean training state."""
from __future__ import annotations

import os
import os.path as osp
from typing import Any, Optional, Sequence

import torch
from mmengine.hooks import CheckpointHook as _MMCheckpointHook
from mmengine.hooks import Hook, LoggerHook, RuntimeInfoHook
from mmengine.model import is_model_wrapper
from torch import Tensor

from .. import data as gdata
from ..guard import NonFiniteLossError
from ..resume import capture_rng_state, restore_rng_state
from .optim import DeferredScalars
from .registry import HOOKS

__all__ = ['DeferredRuntimeInfoHook', 'DrawPredictionsHook', 'ValRandomStateHook', 'DataReportHook',
           'CheckpointHook']


@HOOKS.register_module()
class DeferredRuntimeInfoHook(RuntimeInfoHook):
    """mmengine's ``RuntimeInfoHook`` (epoch/iter/lr/metrics into the MessageHub) that keeps the
    per-iteration losses (and the grad norm) on the device and hands them to the MessageHub in
    ONE host sync per logging interval, just before the LoggerHook reads them.

    The gradient norm is logged (``grad_norm``) with or without ``clip_grad``: with it, the
    optim wrapper's clipping returns it; without, this hook computes it before each optimizer
    step (one foreach norm over the gradients, on the device).

    The MessageHub ends up holding exactly what mmengine's hook would have put there (one value
    per iteration), so the smoothed log lines are the same; mmengine's hook calls ``.item()`` on
    every loss every iteration, which stalls the GPU queue.
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        super().before_train(runner)
        self._pending: list[dict] = []
        loggers = [h for h in runner.hooks if isinstance(h, LoggerHook)]
        self._logger_hook = loggers[0] if loggers else None
        ow = runner.optim_wrapper
        if isinstance(ow, DeferredScalars):
            ow.defer_scalars = True
        self._grad_norm: Optional[Tensor] = None
        self._remove_norm_hook()
        if not getattr(ow, 'clip_grad_kwargs', None):  # with clip_grad the wrapper logs the norm
            self._norm_hook = ow.optimizer.register_step_pre_hook(self._record_grad_norm)

    def _record_grad_norm(self, optimizer, args, kwargs) -> None:
        """Before every optimizer step: the total gradient norm (as ``clip_grad_norm_`` computes
        it: one foreach norm per device and dtype, then the norm of those), kept on the device.
        Under float16 AMP the GradScaler has unscaled the gradients by then; a step it skips is
        not recorded."""
        grads = [p.grad for g in optimizer.param_groups for p in g['params'] if p.grad is not None]
        if grads:
            with torch.no_grad():
                self._grad_norm = torch.linalg.vector_norm(
                    torch.stack([n.float() for n in torch._foreach_norm(grads)]))

    def _remove_norm_hook(self) -> None:
        handle = getattr(self, '_norm_hook', None)
        if handle is not None:
            handle.remove()
            self._norm_hook = None

    def _log_now(self, runner, batch_idx: int) -> bool:
        logger = getattr(self, '_logger_hook', None)
        interval = logger.interval if logger is not None else 1
        return (self.every_n_inner_iters(batch_idx, interval)
                or self.every_n_train_iters(runner, interval)
                or self.end_of_epoch(runner.train_dataloader, batch_idx)
                or runner.iter + 1 >= runner.max_iters
                or (hasattr(logger, 'logs_early') and logger.logs_early(runner)))

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        ow = runner.optim_wrapper
        if getattr(ow, 'step_skipped', False):
            outputs = None  # non-finite losses of a skipped step: counted and logged by the guard
        vals = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in (outputs or {}).items()}
        if isinstance(ow, DeferredScalars):
            vals.update(ow.pop_pending_scalars())
        if self._grad_norm is not None:
            vals['grad_norm'] = self._grad_norm
            self._grad_norm = None
        # the guard's verdict when it stays on the device: the values are dropped at the flush
        self._pending.append((vals, getattr(ow, 'last_step_bad', None)))
        if self._log_now(runner, batch_idx):
            self.flush(runner)

    def flush(self, runner) -> None:
        """Let the optim wrapper's guard read its pending verdicts (counting, logging, maybe
        stopping), then write the pending values of the steps it did not skip to the MessageHub
        (one device->host copy for all)."""
        settle = getattr(runner.optim_wrapper, 'settle', None)
        if settle is not None:
            settle()
        pending, self._pending = getattr(self, '_pending', []), []
        if not pending:
            return
        tensors = [t for d, bad in pending
                   for t in [v for v in d.values() if isinstance(v, Tensor)] + ([bad] if bad is not None else [])]
        host = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist()) if tensors else None
        for d, bad in pending:
            vals = [(k, next(host) if isinstance(v, Tensor) else v) for k, v in d.items()]
            if bad is not None and next(host) > 0:
                continue  # a skipped step (its NaN loss would spoil the smoothed values)
            for k, v in vals:
                runner.message_hub.update_scalar(f'train/{k}', v)

    def before_val(self, runner) -> None:
        self.flush(runner)
        super().before_val(runner)

    def after_train(self, runner) -> None:
        self.flush(runner)
        self._remove_norm_hook()
        super().after_train(runner)


@HOOKS.register_module()
class DrawPredictionsHook(Hook):
    """Writes each test image with its predicted boxes, class names and scores to ``out_dir``
    (same file name as the image)."""

    def __init__(self, out_dir: str, score_thr: float = 0.3):
        self.out_dir = out_dir
        self.score_thr = score_thr

    def after_test_iter(self, runner, batch_idx: int, data_batch: Any = None,
                        outputs: Optional[Sequence[dict]] = None) -> None:
        import cv2

        from ..visualize import draw_detections
        dataset = runner.test_dataloader.dataset
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        names = getattr(model, 'class_names', None) or getattr(dataset, 'classes', None)
        os.makedirs(self.out_dir, exist_ok=True)
        for pred, meta in zip(outputs or [], data_batch['metas']):
            if meta.get('load_failed'):
                continue
            img = gdata.load_image(osp.join(dataset.img_dir, meta['file_name']))
            drawn = draw_detections(img, pred, names, self.score_thr)
            cv2.imwrite(osp.join(self.out_dir, osp.basename(meta['file_name'])),
                        cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))


@HOOKS.register_module()
class ValRandomStateHook(Hook):
    """Validation leaves the random number generators as it found them (states saved in
    ``before_val``, put back in ``after_val``).

    Why: a checkpoint is written at the end of an epoch, *before* that epoch's validation, and
    holds the generators' states (:meth:`GFLRunner.save_checkpoint`); the resumed run goes
    straight on with training. Validation draws from torch's generator (every DataLoader
    iterator draws a base seed), so without this the uninterrupted run and the resumed one
    would train on differently seeded data. As a bonus, ``val_interval`` no longer changes the
    training trajectory. :class:`GFLRunner` registers it itself.
    """

    priority = 'VERY_HIGH'

    def before_val(self, runner) -> None:
        self._state = capture_rng_state()

    def after_val(self, runner) -> None:
        state = getattr(self, '_state', None)
        if state is not None:
            restore_rng_state(state)
            self._state = None


@HOOKS.register_module()
class DataReportHook(Hook):
    """Reports bad input in the run's log (and so in the log file), with counts and file names.

    * before training / validation / testing: what the dataset skipped or repaired when it was
      loaded (:class:`gfl_det.data.SkipReport`: missing files, bad boxes, unknown ids, ...);
    * during training: images that failed to decode (or disagreed with the JSON) and were
      replaced by another image -- collected from the batch metas, so those found in DataLoader
      worker processes count too -- one warning line per iteration that had any;
    * after training: the whole training report (load time + this run's replacements).

    Images that fail in evaluation are counted by :class:`CocoMetric`. :class:`GFLRunner`
    registers this hook itself.
    """

    priority = 'BELOW_NORMAL'

    def __init__(self) -> None:
        self.runtime = gdata.SkipReport()
        self._load_report = gdata.SkipReport()
        self._reported: set = set()

    def _report_dataset(self, runner, loader: Any, what: str) -> None:
        ds = getattr(loader, 'dataset', None)
        rep = getattr(ds, 'skipped', None)
        if not isinstance(rep, gdata.SkipReport) or id(ds) in self._reported:
            return
        self._reported.add(id(ds))
        if rep.total:
            runner.logger.warning(f'{what} data {getattr(ds, "ann_file", "")}: {len(ds)} images in '
                                  f'use; found at load (skipped, or repaired as noted):\n{rep}')

    def before_train(self, runner) -> None:
        loader = runner.train_dataloader
        self._report_dataset(runner, loader, 'training')
        rep = getattr(getattr(loader, 'dataset', None), 'skipped', None)
        self._load_report = gdata.SkipReport().merge(rep) if isinstance(rep, gdata.SkipReport) \
            else gdata.SkipReport()

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        metas = data_batch.get('metas') if isinstance(data_batch, dict) else None
        if not metas or not any('skipped' in m for m in metas):
            return
        new = gdata.SkipReport().add_from_metas(metas)
        self.runtime.merge(new)
        runner.logger.warning(
            f'iteration {runner.iter + 1}: {new.total} bad image(s) replaced by other images in '
            'this batch: ' + '; '.join(f'{r} {", ".join(new.files(r))}' for r in sorted(new.counts))
            + f' ({self.runtime.total} replaced in this run so far)')

    def after_train(self, runner) -> None:
        total = gdata.SkipReport().merge(self._load_report).merge(self.runtime)
        if total.total:
            runner.logger.warning('training data report (skipped at load, and bad images '
                                  f'replaced during this run):\n{total}')
        else:
            runner.logger.info('training data report: no problems')

    def before_val(self, runner) -> None:
        self._report_dataset(runner, runner.val_dataloader, 'validation')

    def before_test(self, runner) -> None:
        self._report_dataset(runner, runner.test_dataloader, 'test')


@HOOKS.register_module(name='CheckpointHook')
class CheckpointHook(_MMCheckpointHook):
    """mmengine's ``CheckpointHook`` (configs name it ``'CheckpointHook'``, same arguments) that
    saves only a clean training state: it asks :meth:`GFLRunner.dirty_reason` first, and while
    the non-finite guard has a streak open or the gradient or the weights have diverged
    (:meth:`gfl_det.guard.NonFiniteGuard.dirty_reason`) it writes no epoch / iteration
    checkpoint, deletes no old one to make room, and chooses no new best -- the log says why.
    Non-finite weights stop training (:class:`gfl_det.guard.NonFiniteLossError`), and so does
    a run that ends with its last checkpoint unsaved: the final state is a diverged one."""

    unsaved: Optional[str] = None  # why the last checkpoint due was not written

    def before_train(self, runner) -> None:
        super().before_train(runner)
        guard = getattr(runner.optim_wrapper, 'guard', None)
        if guard is not None and hasattr(runner, 'dirty_reason'):
            runner.dirty_reason()  # the weights' reference size: when training starts

    def after_train(self, runner) -> None:
        super().after_train(runner)
        if self.unsaved:
            raise NonFiniteLossError(f'training ended in a state that was not saved: {self.unsaved}.')

    def _clean(self, runner, what: str, filename: str) -> bool:
        why = runner.dirty_reason(filename) if hasattr(runner, 'dirty_reason') else None
        if why:
            runner.logger.warning(f'iteration {runner.iter}: {what} NOT saved: {why}')
            self.unsaved = f'iteration {runner.iter}: {why}'
        return not why

    def _save_checkpoint(self, runner) -> None:
        step = runner.epoch + 1 if self.by_epoch else runner.iter + 1
        if self._clean(runner, 'checkpoint', self.filename_tmpl.format(step)):
            super()._save_checkpoint(runner)
            self.unsaved = None

    def _save_best_checkpoint(self, runner, metrics) -> None:
        step = runner.epoch if self.by_epoch else runner.iter
        if not self.save_best or self._clean(runner, 'best checkpoint (no new best chosen)',
                                             f'best_{self.filename_tmpl.format(step)}'):
            super()._save_best_checkpoint(runner, metrics)
