"""What a run shows on the console, and what only its log file keeps.

* :class:`ConsoleFilter` -- mmengine's start-up dump (system environment, the whole config, the
  hook order: ~400 lines) and its internal notices go to the log file only; the console keeps
  everything else (warnings, progress, validation, errors). Attached by :class:`GFLRunner` to
  the console handler of its own logger: mmengine itself is not changed.
* :func:`header` -- the few lines the console shows instead: config, work dir, log file,
  dataset sizes, schedule, device.
* :class:`ProgressLoggerHook` -- mmengine's ``LoggerHook`` (registered under that name in
  gfl_det's scope, so configs keep saying ``type='LoggerHook'``) with ``interval='auto'``: a
  line every ``min(50, max(1, iterations per epoch // 5))`` iterations, and progress lines with
  ETA at iterations 1, 2, 4, 8, ... before the first interval.
* :func:`log_exception` -- a traceback written into the run's log file (a run that fails to
  start leaves its reason beside its timestamped folder's log, not only on the terminal).
"""
from __future__ import annotations

import logging
import os
import traceback
from typing import Any, Optional, Union

import torch
from mmengine.hooks import LoggerHook
from mmengine.runner import BaseLoop

from .registry import HOOKS

__all__ = ['ConsoleFilter', 'ProgressLoggerHook', 'auto_interval', 'header', 'log_exception',
           'log_startup_failure', 'log_to_file', 'quiet_console', 'file_handlers', 'interrupted_message']

# messages mmengine logs that the console does not show (the log file keeps them)
FILE_ONLY_PREFIXES = (
    '\n' + '-' * 60 + '\nSystem environment:',  # Runner._log_env
    'Config:\n',  # Runner._log_env
    'Hooks will be executed in the following order',  # Runner.__init__
    'Distributed training is not used, all SyncBatchNorm',  # Runner.build_model
    '"FileClient" will be deprecated', '"HardDiskBackend" is the alias',  # CheckpointHook internals
    'Checkpoints will be saved to',  # the header names the work dir
    'Exp name: ',  # every epoch's end
)


class ConsoleFilter(logging.Filter):
    """Drops the records whose message starts with one of :data:`FILE_ONLY_PREFIXES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        return not msg.startswith(FILE_ONLY_PREFIXES)


def file_handlers(logger: logging.Logger) -> list[logging.FileHandler]:
    return [h for h in logger.handlers if isinstance(h, logging.FileHandler)]


def quiet_console(logger: logging.Logger) -> None:
    """Adds :class:`ConsoleFilter` to the logger's console handlers (once)."""
    for h in logger.handlers:
        if (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                and not any(isinstance(f, ConsoleFilter) for f in h.filters)):
            h.addFilter(ConsoleFilter())


def log_to_file(logger: Optional[logging.Logger], level: int, msg: str,
                exc: Optional[BaseException] = None) -> None:
    """``msg`` into the logger's log file(s) only, not on the console (an error record names
    the place ``exc`` was raised, as mmengine's error lines name theirs)."""
    if logger is None:
        return
    frames = traceback.extract_tb(exc.__traceback__) if exc is not None else []
    where = frames[-1] if frames else None
    record = logger.makeRecord(logger.name, level, where.filename if where else __file__,
                               where.lineno if where else 0, msg, None, None,
                               func=where.name if where else None)
    for h in file_handlers(logger):
        h.handle(record)
        h.flush()


def log_exception(logger: Optional[logging.Logger], exc: BaseException, what: str) -> None:
    """Writes ``what`` and the traceback of ``exc`` into the logger's log file(s) only (the
    console has it already from Python, or a short message from the tool); marks ``exc`` as
    logged (``exc.gfl_logged``) so that nothing writes it twice."""
    if logger is None or getattr(exc, 'gfl_logged', False):
        return
    text = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    log_to_file(logger, logging.ERROR, f'{what}\n{text}', exc)
    try:
        exc.gfl_logged = True
    except AttributeError:  # an exception type with __slots__
        pass


def log_startup_failure(runner: Any, exc: BaseException) -> None:
    """For a runner whose construction failed: the traceback into its log file when the logger
    exists (marked on ``exc`` so that the tool does not write it twice), else its empty
    timestamped folder removed -- a failed start never leaves a folder without its reason."""
    logger = runner.__dict__.get('logger')
    if logger is not None:
        log_exception(logger, exc, 'interrupted while starting:' if isinstance(exc, KeyboardInterrupt)
                      else 'the run failed to start:')
        return
    log_dir = runner.__dict__.get('_log_dir')
    if log_dir and os.path.isdir(log_dir) and not os.listdir(log_dir):
        os.rmdir(log_dir)


def auto_interval(iters_per_epoch: int) -> int:
    """A log line about five times per epoch, at most every 50 iterations (mmdet's fixed 50)."""
    return min(50, max(1, int(iters_per_epoch) // 5))


def _short(path: str) -> str:
    """``path`` relative to the current folder when it lies inside it, else as it is."""
    rel = os.path.relpath(path)
    return path if rel.startswith('..') else rel


def _device(runner) -> str:
    model = getattr(runner.model, 'module', runner.model)
    try:
        dev = next(model.parameters()).device
    except (StopIteration, AttributeError):
        dev = torch.device('cpu')
    if dev.type == 'cuda':
        name = f'{dev} ({torch.cuda.get_device_name(dev)})'
    else:
        name = f'{dev.type} ({torch.get_num_threads()} threads)'
    procs = runner.world_size
    name += f', {procs} processes' if procs > 1 else ', 1 process'
    ow = getattr(runner, 'optim_wrapper', None)
    dtype = getattr(ow, 'cast_dtype', None)
    if dtype is not None:
        name += f', mixed precision {str(dtype).replace("torch.", "")}'
    return name


def _data(loader: Any, what: str) -> str:
    n = len(loader.dataset) if hasattr(loader.dataset, '__len__') else '?'
    return f'{what} {n} images'


def header(runner, mode: str, log_interval: Optional[int] = None) -> str:
    """The console's start-up lines for ``mode`` 'train' or 'test' (also written to the log)."""
    cfg_file = getattr(runner.cfg, 'filename', None) or '(config object)'
    log_files = [h.baseFilename for h in file_handlers(runner.logger)]
    lines = [f'gfl_det {mode}: {cfg_file}',
             f'  work dir: {_short(runner.work_dir)}',
             f'  log file: {_short(log_files[0]) if log_files else "(none)"} (the environment, the full '
             'config and the hook order are there)']
    if mode == 'train':
        loop = runner.train_loop
        loader = loop.dataloader
        bs = getattr(loader.batch_sampler, 'batch_size', None) or loader.batch_size
        data = f'{_data(loader, "train")} ({len(loader)} iterations of {bs} per epoch'
        data += ' per process)' if runner.world_size > 1 else ')'
        if isinstance(runner._val_loop, BaseLoop):
            data += ', ' + _data(runner.val_dataloader, 'val')
        lines.append(f'  data: {data}')
        epochs = getattr(loop, "max_epochs", "?")
        sched = f"{epochs} epoch{'' if epochs == 1 else 's'} = {loop.max_iters} iterations"
        val_every = getattr(loop, 'val_interval', None)
        if isinstance(runner._val_loop, BaseLoop) and val_every:
            sched += ', validation every epoch' if val_every == 1 else f', validation every {val_every} epochs'
        if log_interval:
            sched += f'; a log line every {log_interval} iteration{"s" if log_interval > 1 else ""}'
        lines.append(f'  schedule: {sched}')
    else:
        lines.append(f'  data: {_data(runner.test_dataloader, "test")}')
        lines.append(f'  checkpoint: {runner._load_from}')
    lines.append(f'  device: {_device(runner)}')
    return '\n'.join(lines)


@HOOKS.register_module(name='LoggerHook')
class ProgressLoggerHook(LoggerHook):
    """mmengine's ``LoggerHook`` with an interval that follows the epoch length and progress
    from the first iterations.

    Args:
        interval: ``'auto'`` (the default): :func:`auto_interval` of the loop's iterations per
            epoch (training, validation and testing each their own), and the log processor's
            smoothing window set to it, so that every line averages the iterations since the
            last one; an int: that interval, as mmengine's (a config that sets one keeps it).
        early: also log the training iterations 1, 2, 4, 8, ... (counted from the start or the
            resume) that come before the first interval: their lines carry the ETA from the
            first iterations on (mmengine's IterTimerHook averages the time so far).
        **kwargs: mmengine's ``LoggerHook`` arguments.

    Also writes the console :func:`header` when a run starts (before the checkpoint, if any,
    is loaded).
    """

    def __init__(self, interval: Union[int, str] = 'auto', early: bool = True, **kwargs: Any):
        if interval != 'auto' and not isinstance(interval, int):
            raise TypeError(f"LoggerHook interval must be an int or 'auto', got {interval!r}")
        self.auto = interval == 'auto'
        super().__init__(interval=50 if self.auto else interval, **kwargs)
        self.early = bool(early)
        self._start_iter = 0
        self._train_interval = self.interval

    def _set_interval(self, runner, n_iters: int) -> None:
        if self.auto:
            self.interval = auto_interval(n_iters)
            runner.log_processor.window_size = self.interval

    def before_run(self, runner) -> None:
        super().before_run(runner)
        if isinstance(runner._train_loop, BaseLoop):  # runner.train(): its loops are built
            self._set_interval(runner, len(runner.train_dataloader))
            self._train_interval = self.interval
            runner.logger.info(header(runner, 'train', self.interval))
        elif isinstance(runner._test_loop, BaseLoop):
            runner.logger.info(header(runner, 'test'))

    def before_train(self, runner) -> None:
        self._start_iter = runner.iter

    def logs_early(self, runner) -> bool:
        """Whether this training iteration gets an early progress line (see ``early``)."""
        n = runner.iter + 1 - self._start_iter
        return self.early and n < self._train_interval and n & (n - 1) == 0

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        if self.logs_early(runner) and not self.every_n_inner_iters(batch_idx, self.interval):
            tag, log_str = runner.log_processor.get_log_after_iter(runner, batch_idx, 'train')
            runner.logger.info(log_str)
            runner.visualizer.add_scalars(tag, step=runner.iter + 1, file_path=self.json_log_path)
            return
        super().after_train_iter(runner, batch_idx, data_batch, outputs)

    def before_val(self, runner) -> None:
        self._set_interval(runner, len(runner.val_dataloader))

    def after_val(self, runner) -> None:
        if self.auto:
            self.interval = self._train_interval
            runner.log_processor.window_size = self.interval

    def before_test(self, runner) -> None:
        self._set_interval(runner, len(runner.test_dataloader))


def interrupted_message(work_dir: str, argv: list[str], checkpoint: Optional[str],
                        where: str = '') -> str:
    """What a Ctrl-C tells the user: how to continue (``--resume``) and from which checkpoint."""
    cmd = ['python', 'tools/train.py'] + [a for a in argv if a != '--resume']
    work_dir = os.path.normpath(work_dir)
    if not any(a == '--work-dir' or a.startswith('--work-dir=') for a in argv):
        cmd += ['--work-dir', work_dir]
    cmd.append('--resume')
    msg = f'interrupted{where}. Continue with\n    {" ".join(cmd)}\n'
    if checkpoint:
        msg += (f'which resumes from the newest checkpoint in {work_dir}: {os.path.basename(checkpoint)} '
                '(the iterations after it are trained again).')
    else:
        msg += (f'No checkpoint had been written to {work_dir} yet (one is written at the end of every '
                'epoch), so --resume would start from the beginning.')
    return msg
