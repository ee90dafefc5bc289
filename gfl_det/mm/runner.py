"""mmengine's Runner with gfl_det's checkpoint policy.

Checkpoint policy (see :mod:`gfl_det.checkpoint`): gfl_det never unpickles a checkpoint.

* :meth:`GFLRunner.save_checkpoint` writes with :func:`gfl_det.checkpoint.atomic_save` (a kill
  never leaves a half-written ``epoch_N.pth``) and stores only plain data
  (:func:`gfl_det.checkpoint.to_plain`: mmengine's MessageHub and its ``HistoryBuffer``
  objects, numpy values, the random generators' states, optimizer, scheduler and AMP scaler
  states become dicts, lists, numbers and tensors; anything else is refused before writing).
  Only a clean training state is saved (:meth:`GFLRunner.dirty_reason`, asked by
  :class:`gfl_det.mm.hooks.CheckpointHook`).
* Every load -- :meth:`GFLRunner.resume` (``--resume``, auto or PATH), ``load_from``,
  tools/test.py -- reads with ``weights_only=True`` (:func:`gfl_det.checkpoint.load_untrusted`).
  A full checkpoint written by plain mmengine / MMDetection holds pickled objects and is
  refused, naming the one way on: ``python -m gfl_det.checkpoint convert --trust IN OUT``.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import os.path as osp
import time
from collections import OrderedDict
from typing import Any, Optional, Union

import mmengine
import torch
from mmengine.config import Config
from mmengine.dist import master_only
from mmengine.logging import HistoryBuffer, MessageHub, MMLogger
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner
from mmengine.runner.checkpoint import weights_to_cpu

from ..checkpoint import (HISTORY_BUFFER, atomic_save, load_untrusted, load_weights, read_meta,
                          to_plain)
from ..guard import NonFiniteGuard, NonFiniteLossError
from .console import log_startup_failure, quiet_console
from ..resume import capture_rng_state, find_latest_checkpoint, remove_partial_saves, restore_rng_state
from .hooks import DataReportHook, ValRandomStateHook
from .registry import FUNCTIONS, RUNNERS

__all__ = ['GFLRunner', 'MemoConfig', 'encode_message_hub', 'decode_message_hub']


class MemoConfig(Config):
    """mmengine's ``Config`` whose ``pretty_text`` is computed once per content.

    mmengine formats ``pretty_text`` with yapf on every call (~0.4 s on a CPU), and a training
    run asks for it at least five times when it starts plus once per checkpoint: a few seconds
    per run, most of a short one's start-up. :class:`GFLRunner` runs on this subclass; the text
    is the same, memoised on ``repr(cfg.to_dict())`` (a changed config is formatted again)."""

    @classmethod
    def of(cls, cfg: Config) -> 'MemoConfig':
        if isinstance(cfg, cls):
            return cfg
        other = cls.__new__(cls)
        other.__dict__.update(cfg.__dict__)
        return other

    @property
    def pretty_text(self) -> str:
        key = (repr(self.to_dict()), bool(getattr(self, '_format_python_code', True)))
        memo = self.__dict__.get('_pretty_memo')
        if memo is None or memo[0] != key:
            memo = (key, Config.pretty_text.fget(self))
            super(Config, self).__setattr__('_pretty_memo', memo)
        return memo[1]


def encode_message_hub(state: dict) -> dict:
    """mmengine ``MessageHub.state_dict()`` -> plain data that ``weights_only=True`` loads
    (:func:`gfl_det.checkpoint.to_plain`): each ``HistoryBuffer`` becomes ``{HISTORY_BUFFER:
    True, 'log_history': [...], 'count_history': [...], 'max_length': n}``; numpy values become
    Python numbers; anything else raises, naming it."""
    return to_plain(state, 'message_hub')


def decode_message_hub(state: dict) -> dict:
    """Inverse of :func:`encode_message_hub` (a plain mmengine state dict passes unchanged)."""
    def back(x: Any) -> Any:
        if isinstance(x, dict) and x.get(HISTORY_BUFFER):
            return HistoryBuffer(x['log_history'], x['count_history'], x['max_length'])
        if isinstance(x, dict):
            return OrderedDict((k, back(v)) for k, v in x.items())
        return x
    out = dict(state)
    out['log_scalars'] = back(state.get('log_scalars', {}))
    return out


def _to_cpu(x: Any) -> Any:
    """Every tensor in a plain structure (dicts, lists, tuples) moved to the CPU."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        out = type(x)((k, _to_cpu(v)) for k, v in x.items())
        if getattr(x, '_metadata', None) is not None:
            out._metadata = x._metadata
        return out
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _local_checkpoint(filename: str) -> str:
    """A local path for ``filename``; http(s) URLs are downloaded to torch's hub cache first."""
    if filename.startswith(('http://', 'https://')):
        from urllib.parse import urlparse
        dst = osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(urlparse(filename).path))
        if not osp.isfile(dst):
            os.makedirs(osp.dirname(dst), exist_ok=True)
            torch.hub.download_url_to_file(filename, dst)
        return dst
    if '://' in filename:
        raise ValueError(f'cannot load {filename!r}: give a local file or an http(s) URL')
    return filename


@RUNNERS.register_module()
class GFLRunner(Runner):
    """mmengine's Runner with gfl_det's checkpoint policy (see the module docstring) and data
    loader defaults (``pin_memory`` when CUDA is present, a generator of the loader's own)."""

    _resuming = False
    _resumed_rng: Optional[dict] = None

    def __init__(self, *args: Any, cfg: Optional[Union[Config, dict]] = None, **kwargs: Any):
        if isinstance(cfg, dict) and not isinstance(cfg, Config):
            cfg = Config(cfg)
        # gfl_det.data's own warnings (for plain-PyTorch use) would print every bad image a
        # second time, bare, from every worker process: DataReportHook and CocoMetric report
        # them in the run's log. A NullHandler keeps them off the console (set before any
        # worker forks; a logging configuration of the user's own still receives them).
        data_log = logging.getLogger('gfl_det.data')
        if not any(isinstance(h, logging.NullHandler) for h in data_log.handlers):
            data_log.addHandler(logging.NullHandler())
        try:
            super().__init__(*args, cfg=None if cfg is None else MemoConfig.of(cfg), **kwargs)
        except BaseException as e:  # a failed start: its reason goes into the run's log file
            log_startup_failure(self, e)
            raise

    # ------------------------------------------------------------------ hooks, train
    def register_hooks(self, default_hooks: Optional[dict] = None,
                       custom_hooks: Optional[list] = None) -> None:
        """mmengine's, plus :class:`ValRandomStateHook` and :class:`DataReportHook` unless the
        config already has them."""
        super().register_hooks(default_hooks, custom_hooks)
        for cls in (ValRandomStateHook, DataReportHook):
            if not any(isinstance(h, cls) for h in self._hooks):
                self.register_hook(cls())

    def train(self) -> torch.nn.Module:
        """mmengine's; a :class:`NonFiniteLossError` (too many non-finite steps in a row, or
        non-finite weights at a checkpoint) gets the last good checkpoint added to its message
        and is logged before it propagates. The last good checkpoint is the newest in the work
        dir that was saved in a clean state (``meta['clean']``, see :meth:`dirty_reason`)."""
        try:
            return super().train()
        except NonFiniteLossError as e:
            clean = lambda meta: meta.get('clean') is True  # noqa: E731
            try:
                ckpt = find_latest_checkpoint(self.work_dir, logger=self.logger, accept=clean)
            except Exception as err:  # noqa: BLE001 -- the error at hand matters more
                ckpt, where = None, f'No last good checkpoint could be determined ({err}).'
            else:
                where = 'No checkpoint had been saved in a clean state.'
            if ckpt is not None:
                meta = read_meta(ckpt)
                where = (f'The last good checkpoint is {ckpt} (epoch {meta.get("epoch")}, '
                         f'iteration {meta.get("iter")}); continue from it with '
                         '`tools/train.py CONFIG --resume` once the cause is fixed.')
            e.args = (f'{e.args[0] if e.args else e} {where} No checkpoint was written from '
                      'the broken state.',) + tuple(e.args[1:])
            self.logger.error(e.args[0])
            raise

    # ------------------------------------------------------------------ logger
    def build_logger(self, log_level: Union[int, str] = 'INFO', log_file: Optional[str] = None,
                     **kwargs: Any) -> MMLogger:
        """mmengine's, with a name of its own: mmengine names the logger and the MessageHub
        after the config file and the second the run started, and ``get_instance`` hands back
        an existing instance of that name -- so a second run of the same config started in the
        same second of the same process (``tools/test.py`` after ``tools/train.py`` in a
        notebook) would write into the first run's log file and share its MessageHub. A suffix
        (``_2``, ``_3``, ...) keeps them apart."""
        if 'name' not in kwargs and MMLogger.check_instance_created(self._experiment_name):
            base, i = self._experiment_name, 2
            while (MMLogger.check_instance_created(f'{base}_{i}')
                   or MessageHub.check_instance_created(f'{base}_{i}')):
                i += 1
            self._experiment_name = f'{base}_{i}'
        logger = super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
        quiet_console(logger)  # environment, config and hook order: to the log file only
        return logger

    # ------------------------------------------------------------------ CPU multi-process
    def setup_env(self, env_cfg: dict) -> None:
        """mmengine's pytorch launcher calls ``torch.cuda.set_device``; without CUDA we start the
        process group ourselves (gloo), so that torchrun also works on CPU-only machines."""
        import torch.distributed as tdist
        if (self.distributed and self.launcher == 'pytorch' and not torch.cuda.is_available()
                and not tdist.is_initialized()):
            tdist.init_process_group(backend='gloo')
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg: Optional[dict], model: torch.nn.Module) -> Any:
        if self.distributed and not torch.cuda.is_available() and model_wrapper_cfg is None:
            # DDP over CPU processes takes no device_ids (mmengine passes LOCAL_RANK)
            model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None)
        return super().wrap_model(model_wrapper_cfg, model)

    # ------------------------------------------------------------------ data
    @staticmethod
    def build_dataloader(dataloader: Any, seed: Optional[int] = None,
                         diff_rank_seed: bool = False) -> Any:
        if isinstance(dataloader, dict):
            dataloader = copy.deepcopy(dataloader)
            if 'pin_memory' not in dataloader:
                dataloader['pin_memory'] = torch.cuda.is_available()
            if not dataloader.get('num_workers', 0):
                dataloader.pop('persistent_workers', None)  # DataLoader refuses it without workers
            if 'generator' not in dataloader:
                # the loader's own generator draws the workers' base seed, not torch's global
                # one: persistent workers (one draw) and fresh ones (one per epoch) would
                # otherwise leave the training process's generator in different states
                dataloader['generator'] = torch.Generator().manual_seed(0 if seed is None else seed)
            collate = dataloader.get('collate_fn')
            if isinstance(collate, dict) and isinstance(collate.get('type'), str):
                # mmengine looks collate functions up in its root registry only
                fn = FUNCTIONS.get(collate['type'])
                if fn is not None:
                    dataloader['collate_fn'] = dict(collate, type=fn)
        return Runner.build_dataloader(dataloader, seed=seed, diff_rank_seed=diff_rank_seed)

    # ------------------------------------------------------------------ save
    def dirty_reason(self, filename: str = 'the checkpoint') -> Optional[str]:
        """None when the training state may be saved, else why not: the non-finite guard's
        verdict (:meth:`gfl_det.guard.NonFiniteGuard.dirty_reason`: a non-finite streak open, the
        gradient or the weights diverged). Raises :class:`NonFiniteLossError` when a weight is
        NaN/Inf (training cannot go on; ``filename`` is named as not written)."""
        settle = getattr(self.optim_wrapper, 'settle', None)
        if settle is not None:
            settle()  # the guard's verdicts still on the device
        model = self.model.module if is_model_wrapper(self.model) else self.model
        state = model.state_dict()
        # weights and BN statistics; a running variance as its standard deviation -- a squared
        # scale would flag the ordinary growth of an unnormalised feature's scale (the embedding
        # branch's BN neck sees raw ReLU features: variance 2e4, std 140, is no divergence)
        biggest = NonFiniteGuard.max_abs([v.abs().sqrt() if k.endswith('running_var') else v
                                          for k, v in state.items() if v.is_floating_point()])
        biggest = 0.0 if biggest is None else float(biggest)
        if not math.isfinite(biggest):
            bad = [k for k, v in state.items()
                   if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            raise NonFiniteLossError(
                f'iteration {self.iter}: the model\'s weights are not finite ({len(bad)} '
                f'tensor(s), e.g. {", ".join(bad[:3])}); {filename} was NOT written. Training '
                'stopped; lower the learning rate or enable gradient clipping.')
        guard = getattr(self.optim_wrapper, 'guard', None)
        return None if guard is None else guard.dirty_reason(biggest)

    @master_only
    def save_checkpoint(self, out_dir: str, filename: str, file_client_args: Optional[dict] = None,
                        save_optimizer: bool = True, save_param_scheduler: bool = True,
                        meta: Optional[dict] = None, by_epoch: bool = True,
                        backend_args: Optional[dict] = None) -> None:
        """mmengine's checkpoint contents, written atomically and as plain data only (so it also
        loads with ``weights_only=True``); local files only. Nothing is written from a dirty
        state (:meth:`dirty_reason`: logged); what is written carries ``meta['clean'] = True``."""
        if file_client_args or backend_args or '://' in str(out_dir):
            raise NotImplementedError('gfl_det writes checkpoints to local files only')
        why = self.dirty_reason(filename)
        if why:
            self.logger.warning(f'{filename} NOT written: {why}')
            return
        meta = dict(meta or {})
        if by_epoch:  # called from after_train_epoch, before the epoch counter moves on
            meta.setdefault('epoch', self.epoch + 1)
            meta.setdefault('iter', self.iter)
        else:
            meta.setdefault('epoch', self.epoch)
            meta.setdefault('iter', self.iter + 1)
        meta.update(cfg=self.cfg.pretty_text, seed=self.seed, experiment_name=self.experiment_name,
                    time=time.strftime('%Y%m%d_%H%M%S', time.localtime()),
                    mmengine_version=mmengine.__version__, clean=True)
        dataset_meta = getattr(self.train_dataloader.dataset, 'metainfo', None)
        if dataset_meta is not None:
            meta['dataset_meta'] = copy.deepcopy(dict(dataset_meta))
        model = self.model.module if is_model_wrapper(self.model) else self.model
        checkpoint = {'meta': meta, 'state_dict': weights_to_cpu(model.state_dict()),
                      'message_hub': self.message_hub.state_dict(),
                      # for an exact resume (restored by resume())
                      'rng_state': capture_rng_state()}
        if save_optimizer:
            checkpoint['optimizer'] = self.optim_wrapper.state_dict()
        if save_param_scheduler and self.param_schedulers is not None:
            if isinstance(self.param_schedulers, dict):
                checkpoint['param_schedulers'] = {
                    k: [s.state_dict() for s in v] for k, v in self.param_schedulers.items()}
            else:
                checkpoint['param_schedulers'] = [s.state_dict() for s in self.param_schedulers]
        self.call_hook('before_save_checkpoint', checkpoint=checkpoint)
        # plain data only, on the CPU: anything that would need unpickling is refused, named
        plain = to_plain(checkpoint)
        plain = _to_cpu(plain)
        atomic_save(plain, osp.join(out_dir, filename))

    # ------------------------------------------------------------------ load
    def load_checkpoint(self, filename: str, map_location: Any = 'cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]) -> dict:  # noqa: B006 (mmengine's)
        """Weights into the model, read with ``weights_only=True`` (every file: ``load_from``,
        resume, tools/test.py). Non-strict for ``load_from`` (fine-tuning: keys that do not fit
        are reported and skipped) unless the config says ``load_from_strict = True``
        (tools/test.py); strict for resume. Sets ``model.class_names`` from the checkpoint's
        meta."""
        path = _local_checkpoint(str(filename))
        checkpoint = load_untrusted(path, map_location=map_location)
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get('message_hub'), dict):
            checkpoint['message_hub'] = decode_message_hub(checkpoint['message_hub'])
        if self._resuming and isinstance(checkpoint, dict):  # see resume()
            self._resumed_rng = checkpoint.get('rng_state')
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        strict = strict or self._resuming or bool(self.cfg.get('load_from_strict', False))
        meta = load_weights(model, checkpoint, strict=strict, logger=self.logger)
        if meta.get('classes') and hasattr(model, 'class_names'):
            model.class_names = tuple(meta['classes'])
            self._check_classes(model.class_names)
        self._has_loaded = True
        self.logger.info(f'Loaded checkpoint {filename} (weights_only=True)')
        return checkpoint

    def _check_classes(self, classes: tuple) -> None:
        """Warn when the checkpoint's class names differ from the dataset's (labels would be
        mapped to the wrong categories)."""
        for loop in (self._test_loop, self._val_loop, self._train_loop):
            dataset = getattr(getattr(loop, 'dataloader', None), 'dataset', None)
            names = getattr(dataset, 'classes', None)
            if names is not None:
                if tuple(names) != tuple(classes):
                    self.logger.warning(f'the checkpoint\'s classes {tuple(classes)} differ from the '
                                        f'dataset\'s {tuple(names)}: label i is evaluated as the '
                                        f'dataset\'s class i')
                return

    def resume(self, filename: str, resume_optimizer: bool = True,
               resume_param_scheduler: bool = True, map_location: Any = 'default') -> None:
        """mmengine's resume, reading the file with ``weights_only=True`` (as every load), then
        putting back the random generators' states saved with it (python, numpy, torch, CUDA;
        mmengine only re-seeds them). The AMP GradScaler state comes back with the optimizer
        state (:class:`AmpOptimWrapper`), the non-finite guard's state too (:class:`OptimWrapper`).

        With the data augmentation drawn per sample from (seed, epoch, index) (:mod:`gfl_det.data`)
        and each epoch's order from (seed, epoch) (``DefaultSampler``), a resumed run is
        bit-identical to an uninterrupted one with any ``num_workers`` and persistent workers --
        on the same hardware, deterministic algorithms, resuming from an epoch checkpoint
        (mmengine's EpochBasedTrainLoop restarts a resumed epoch from its first batch). Not
        restored: in a distributed run with ``randomness.diff_rank_seed=True`` (each rank had its
        own states; the checkpoint holds rank 0's).
        """
        self._resuming = True
        self._resumed_rng = None
        try:
            super().resume(filename, resume_optimizer, resume_param_scheduler, map_location)
        finally:
            self._resuming = False
        rng, self._resumed_rng = self._resumed_rng, None
        if rng and not (self.distributed and self._randomness_cfg.get('diff_rank_seed')):
            done = restore_rng_state(rng)
            self.logger.info(f'restored the random generator states ({", ".join(done)}) from '
                             f'{filename}')

    def load_or_resume(self) -> None:
        """``resume=True`` without ``load_from``: the newest complete checkpoint in the work_dir
        (:func:`gfl_det.resume.find_latest_checkpoint` skips truncated files and stops at one
        holding Python objects; the temp files of saves interrupted by a kill are deleted
        first); none found: start from scratch, saying so."""
        if self._has_loaded:
            return
        resume_from = None
        if self._resume and self._load_from is None:
            if self.rank == 0:  # nothing is saving now: drop what killed saves left behind
                remove_partial_saves(self.work_dir, logger=self.logger)
            resume_from = find_latest_checkpoint(self.work_dir, logger=self.logger)
            if resume_from is None:
                self.logger.warning(f'resume: no checkpoint in {self.work_dir}; training from '
                                    'the start')
            else:
                self.logger.info(f'Auto-resuming from the latest checkpoint {resume_from}')
        elif self._resume:
            resume_from = self._load_from
        if resume_from is not None:
            self.resume(resume_from)
        elif self._load_from is not None:
            self.load_checkpoint(self._load_from)
        self._has_loaded = True
