"""Checkpoint I/O: plain data only, every file loaded with ``torch.load(weights_only=True)``.

Trust policy -- gfl_det never unpickles a checkpoint:

* **Every file gfl_det writes holds plain data only**: tensors, numbers, strings, lists, tuples
  and dicts (``GFLRunner.save_checkpoint``: weights, optimizer, lr scheduler, AMP scaler,
  mmengine's message hub with its history buffers, the random generators' states, numpy values
  as Python numbers). :func:`to_plain` converts what mmengine hands over and refuses anything
  else, naming where it sits, before a byte is written.
* **Every load uses ``weights_only=True``** (:func:`load_untrusted`): ``--resume`` (auto and
  PATH), the work dir's ``last_checkpoint``, ``load_from``, tools/test.py, tools/demo.py,
  ``init_detector``. A file that holds Python objects -- a planted payload, or a full training
  checkpoint of plain mmengine / MMDetection -- is refused with
  :class:`UntrustedCheckpointError`, naming the file and torch's reason, before any of its code
  can run.
* **One explicit opt-in** for a pickled file whose source you trust::

      python -m gfl_det.checkpoint convert --trust IN.pth OUT.pth

  unpickles ``IN.pth`` (``weights_only=False``: this runs whatever code the file names) and
  writes a plain copy that keeps the weights and the whole resume state; ``OUT.pth`` then
  loads, resumes and fine-tunes like gfl_det's own files. Without ``--trust`` nothing is
  unpickled.

Writes are atomic (:func:`atomic_save`): a kill at any moment leaves the previous file intact.
Finding the checkpoint to resume from, and the random generators' states saved with it, are in
:mod:`gfl_det.resume`.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import sys
import tempfile
from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

__all__ = [
    'CheckpointError', 'UntrustedCheckpointError', 'CheckpointMismatchError', 'atomic_save',
    'load_untrusted', 'read_meta', 'split_checkpoint', 'load_weights', 'to_plain',
    'convert_trusted', 'PARTIAL_SAVE', 'HISTORY_BUFFER',
]

PathLike = Union[str, os.PathLike]
LogFn = Union[None, logging.Logger, Callable[[str], Any]]
_LOGGER = logging.getLogger(__name__)
PARTIAL_SAVE = re.compile(r'^\..+\.pth\.[^.]+\.tmp$')  # atomic_save's temp files: .NAME.XXXX.tmp
HISTORY_BUFFER = '__history_buffer__'  # marks an mmengine HistoryBuffer encoded by to_plain


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit."""


class UntrustedCheckpointError(CheckpointError):
    """``weights_only=True`` refused a file: it holds more than tensors and plain containers."""


class CheckpointMismatchError(CheckpointError):
    """State-dict keys or shapes do not match the model."""


def _log(logger: LogFn, msg: str, level: int = logging.WARNING) -> None:
    if logger is None:
        _LOGGER.log(level, msg)
    elif isinstance(logger, logging.Logger):
        logger.log(level, msg)
    else:
        logger(msg)


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` such that ``path`` is always either the old or the new file.

    Writes to a hidden temp file in the same directory (``.NAME.XXXX.tmp``), flushes and
    fsyncs it, ``os.replace``s it over ``path`` (atomic on POSIX and Windows) and fsyncs the
    directory so the rename itself survives a power cut. If pickling or writing fails the temp
    file is removed and the old ``path`` is untouched. A SIGKILL can leave a stale ``.tmp`` file
    behind, never a partial ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o777  # keep the permissions of the file we replace
    except FileNotFoundError:
        mode = 0o644  # mkstemp's 0o600 would surprise whoever shares the work_dir
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype,
           torch.device, torch.Size)


def to_plain(x: Any, where: str = 'checkpoint', dropped: Optional[list] = None) -> Any:
    """``x`` as data that ``torch.load(weights_only=True)`` reads back: tensors, numbers,
    strings, ``None``, and lists / tuples / dicts of them.

    Converted: numpy scalars -> Python numbers, numpy arrays -> tensors, other subclasses of the
    plain types (``IntEnum``, ``np.float64``, ...) -> the plain type, sets -> sorted lists, and
    mmengine's ``HistoryBuffer`` -> ``{HISTORY_BUFFER: True, 'log_history': [...],
    'count_history': [...], 'max_length': n}`` (``gfl_det.mm.decode_message_hub`` builds it back).
    A state dict's ``_metadata`` (BatchNorm versions) is kept.

    Anything else (a class instance, a function, ...): with ``dropped`` (a list) it is left out
    and its path (``checkpoint['meta']['x']``) appended; without, :class:`CheckpointError` names
    it -- so nothing that would need unpickling is ever written.
    """
    if type(x) in _LEAVES or isinstance(x, torch.Tensor):
        return x
    if type(x).__module__ == 'numpy':
        if getattr(x, 'ndim', None) == 0 and hasattr(x, 'item'):
            return to_plain(x.item(), where, dropped)   # numpy scalar
        if hasattr(x, 'dtype') and x.dtype != object:
            return torch.from_numpy(x.copy())          # numeric array (np.float64 is a float)
    if type(x).__name__ == 'HistoryBuffer' and hasattr(x, '_log_history'):
        return {HISTORY_BUFFER: True,
                'log_history': [float(v) for v in x._log_history],
                'count_history': [float(v) for v in x._count_history],
                'max_length': int(x.max_length)}
    for t in (bool, int, float, str, bytes):  # IntEnum, str subclasses, ... -> the plain type
        if isinstance(x, t):
            return t(x)
    if isinstance(x, Mapping):
        out = OrderedDict() if isinstance(x, OrderedDict) else {}
        for k, v in x.items():
            key = to_plain(k, f'{where} key {k!r}', dropped)
            if isinstance(key, (torch.Tensor, list, dict)) or key is _DROP:
                _refuse(k, f'{where} key {k!r}', dropped)
                continue
            v = to_plain(v, f'{where}[{k!r}]', dropped)
            if v is not _DROP:
                out[key] = v
        if getattr(x, '_metadata', None) is not None and isinstance(out, OrderedDict):
            out._metadata = to_plain(x._metadata, f'{where}._metadata', dropped)
        return out
    if isinstance(x, (list, tuple, set, frozenset)):
        seq = sorted(x, key=repr) if isinstance(x, (set, frozenset)) else x
        items = [to_plain(v, f'{where}[{i}]', dropped) for i, v in enumerate(seq)]
        items = [v for v in items if v is not _DROP]
        return tuple(items) if type(x) is tuple else items
    return _refuse(x, where, dropped)


_DROP = object()


def _refuse(x: Any, where: str, dropped: Optional[list]) -> Any:
    if dropped is None:
        raise CheckpointError(f'{where} is a {type(x).__module__}.{type(x).__qualname__}, not plain '
                              'data (tensors, numbers, strings, lists, dicts): a checkpoint holding '
                              'it would need unpickling to load, which gfl_det never does; store '
                              'it as plain data (e.g. its state_dict())')
    dropped.append(f'{where} ({type(x).__qualname__})')
    return _DROP


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def load_untrusted(path: PathLike, map_location: Any = 'cpu', mmap: bool = False) -> Any:
    """Load a checkpoint with ``weights_only=True`` -- the only way gfl_det loads one (ours,
    the model zoo's, anyone's: a file is data, never code).

    Raises:
        UntrustedCheckpointError: the file holds Python objects ``weights_only`` refuses; the
            message names the file, torch's reason and the one way on (``convert --trust``).
            Nothing of the file has run.
        CheckpointError: the file is unreadable (truncated, not a checkpoint).
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path!r}')
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if 'weights only load failed' not in str(e).lower():
            raise CheckpointError(f'checkpoint {path!r} could not be read: {_first_line(e)}') \
                from e
        raise UntrustedCheckpointError(untrusted_message(path, e)) from None
    except Exception as e:
        raise CheckpointError(f'checkpoint {path!r} could not be read ({type(e).__name__}: '
                              f'{_first_line(e)}); it may be truncated or corrupt') from e


def read_meta(path: PathLike) -> dict:
    """A checkpoint's ``meta`` dict (``{}`` if none), memory-mapped where the file allows it
    (no tensor data is read); :func:`load_untrusted`'s errors."""
    import zipfile
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise CheckpointError(f'checkpoint {path!r} is empty (0 bytes)')
    ckpt = load_untrusted(path, mmap=zipfile.is_zipfile(path))  # mmap: torch's zip format only
    meta = ckpt.get('meta') if isinstance(ckpt, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else repr(e)


_BOILERPLATE = re.compile(r'weights.only|PyTorch 2\.6|^Check the documentation|trusted source|'
                          r'^\(\d\)|\bdo those steps\b', re.I)


def _torch_reason(e: BaseException) -> str:
    """What torch's weights-only unpickler objected to, from its (version-dependent) message:
    'WeightsUnpickler error: Unsupported global: GLOBAL numpy...' (torch 2.6-2.9), 'Trying to
    load unsupported GLOBAL posix.system whose module posix is blocked.' (later), ..."""
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(e))
    m = re.search(r'WeightsUnpickler error:\s*(.+)', text)
    if m:
        return re.split(r'\s+Please use\b', m.group(1).strip())[0].rstrip('. ')
    for line in text.splitlines():
        line = line.strip()
        if line and not _BOILERPLATE.search(line):
            return re.split(r'\s+Please use\b', line)[0].rstrip('. ')
    return _first_line(e)


def untrusted_message(path: str, e: BaseException) -> str:
    root, ext = os.path.splitext(path)
    out = f'{root}_plain{ext or ".pth"}'
    return (
        f'refusing to load checkpoint {path!r}: torch.load(weights_only=True) found Python objects '
        f'in it, not only tensors and plain containers ({_torch_reason(e)}). gfl_det never '
        f'unpickles a checkpoint: unpickling runs whatever code the file names. Full training '
        f'checkpoints of plain mmengine / MMDetection (message hub, numpy values) look like this; '
        f'so does a file crafted to run code.\n'
        f'Only if you trust where this file came from, convert it once -- this unpickles it '
        f'(running its code) and writes a plain copy that keeps the weights and the resume '
        f'state:\n'
        f'    python -m gfl_det.checkpoint convert --trust {path} {out}\n'
        f'and use {out} instead.')


# ----------------------------------------------------------------------------------------------
# state dicts into models
# ----------------------------------------------------------------------------------------------
def split_checkpoint(ckpt: Any, source: str = '<checkpoint>') -> tuple[Mapping[str, Any], dict]:
    """``(state_dict, meta)`` from a raw state dict, an mmengine/mmdet checkpoint
    (``{'state_dict', 'meta', ...}``) or a ``{'model': state_dict}`` checkpoint (torchvision /
    detectron2 style)."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f'{source}: expected a state dict or a dict with "state_dict", '
                              f'got {type(ckpt).__name__}')
    meta = ckpt.get('meta')
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    for key in ('state_dict', 'model'):
        if isinstance(ckpt.get(key), Mapping):
            return ckpt[key], meta
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, {}
    raise CheckpointError(f'{source}: no state dict found; top-level keys are '
                          f'{_head(list(ckpt))} (expected tensors, or "state_dict"/"model")')


def _strip_module(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop the ``module.`` prefix(es) that DataParallel/DDP add; keeps ``_metadata``."""
    if not any(k.startswith('module.') for k in state_dict):
        return state_dict
    out = OrderedDict()
    for k, v in state_dict.items():
        while k.startswith('module.'):
            k = k[len('module.'):]
        out[k] = v
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        out._metadata = OrderedDict(
            (re.sub(r'^(module\.?)+', '', k), v) for k, v in metadata.items())
    return out


def _classes_from_meta(meta: Mapping[str, Any]) -> Optional[tuple]:
    """Class names: mmdet 3.x keeps them in meta['dataset_meta']['classes'], 2.x in
    meta['CLASSES']."""
    classes = None
    dataset_meta = meta.get('dataset_meta')
    if isinstance(dataset_meta, Mapping):
        classes = dataset_meta.get('classes')
    if classes is None:
        classes = meta.get('CLASSES')
    if classes is None:
        return None
    if isinstance(classes, str):
        return (classes,)
    return tuple(str(c) for c in classes)


def load_weights(model: nn.Module, path_or_state: Union[PathLike, Mapping[str, Any]],
                 strict: bool = True, map_location: Any = 'cpu', logger: LogFn = None) -> dict:
    """Load weights into ``model`` and return the checkpoint's meta.

    Args:
        model: the model (DDP-wrapped models: pass ``model.module``).
        path_or_state: checkpoint path, or an already loaded checkpoint / state dict.
        strict: every key must match with the same shape (default). With ``strict=False``
            keys missing from the checkpoint keep the model's values, unexpected keys and keys
            whose shape differs are skipped, and all three are reported through ``logger``.
        map_location: passed to ``torch.load`` (always ``weights_only=True``:
            :class:`UntrustedCheckpointError` for a file holding Python objects).
        logger: ``logging.Logger`` or print-like callable for the report; ``None`` = this
            module's logger.

    Returns:
        a copy of the checkpoint's ``meta`` (``{}`` for a raw state dict) with added
        ``'classes'``: tuple of class names (mmdet 3.x ``meta['dataset_meta']['classes']``,
        2.x ``meta['CLASSES']``) or None -- for the caller to set ``model.class_names``;
        ``'missing_keys'``, ``'unexpected_keys'``: lists of names; ``'mismatched_keys'``: list
        of ``(name, checkpoint_shape, model_shape)``.

    Raises:
        CheckpointMismatchError: (strict) keys or shapes differ; the message lists them.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        source = os.fspath(path_or_state)
        ckpt = load_untrusted(source, map_location=map_location)
        source = f'checkpoint {source!r}'
    else:
        source, ckpt = 'in-memory checkpoint', path_or_state
    state_dict, meta = split_checkpoint(ckpt, source)
    state_dict = _strip_module(state_dict)

    own = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                  if k in own and hasattr(v, 'shape') and tuple(v.shape) != tuple(own[k].shape)]
    unexpected = [k for k in state_dict if k not in own]
    # num_batches_tracked: BN fills it in itself for checkpoints that predate it (torchvision's
    # ImageNet weights); a counter that does not change outputs is no reason to refuse a file.
    missing = [k for k in own if k not in state_dict and not k.endswith('num_batches_tracked')]
    report = _mismatch_report(mismatched, missing, unexpected)
    if report and strict:
        hint = ('To load every key that fits and keep the model\'s own initialisation for the '
                'rest, pass strict=False.')
        # the classifier: a module named like mmdet's 'gfl_cls'/'fc_cls'/'cls_score'
        cls = [m for m in mismatched if len(m[0].split('.')) >= 2
               and 'cls' in m[0].split('.')[-2] and m[1] and m[2] and m[1][0] != m[2][0]]
        if cls:
            hint += (f' If the class count is what differs (checkpoint {cls[0][1][0]}, model '
                     f'{cls[0][2][0]} in {cls[0][0]}), either fine-tune from it with '
                     f'strict=False (the classifier is re-initialised), or build the model with '
                     f'the checkpoint\'s class count, e.g. --cfg-options '
                     f'model.bbox_head.num_classes={cls[0][1][0]}.')
        raise CheckpointMismatchError(f'{source} does not fit {type(model).__name__}:\n{report}\n'
                                      + hint)
    skip = {m[0] for m in mismatched} | set(unexpected)
    to_load = OrderedDict((k, v) for k, v in state_dict.items() if k not in skip)
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        to_load._metadata = metadata
    model.load_state_dict(to_load, strict=False)
    if report:
        _log(logger, f'loaded {source} non-strictly into {type(model).__name__}:\n{report}')

    out = dict(meta)
    out['classes'] = _classes_from_meta(meta)
    out['missing_keys'] = missing
    out['unexpected_keys'] = unexpected
    out['mismatched_keys'] = mismatched
    return out


def _mismatch_report(mismatched: list, missing: list, unexpected: list, n: int = 20) -> str:
    lines = []
    if mismatched:
        lines.append(f'  {len(mismatched)} key(s) with a different shape (checkpoint -> model):')
        lines += [f'    {k}: {tuple(a)} -> {tuple(b)}' for k, a, b in mismatched[:n]]
        if len(mismatched) > n:
            lines.append(f'    ... and {len(mismatched) - n} more')
    for what, keys in (('missing key(s) (in the model, not in the checkpoint)', missing),
                       ('unexpected key(s) (in the checkpoint, not in the model)', unexpected)):
        if keys:
            lines.append(f'  {len(keys)} {what}: {_head(keys, n)}')
    return '\n'.join(lines)


def _head(items: list, n: int = 10) -> str:
    s = ', '.join(map(str, items[:n]))
    return s + (f', ... ({len(items)} in all)' if len(items) > n else '')


def trust_flag_removed(checkpoint: str) -> str:
    """The tools' answer to the removed ``--trust-checkpoint`` flag."""
    return (f'--trust-checkpoint was removed: gfl_det never unpickles a checkpoint. If you trust '
            f'the source of {checkpoint}, convert it once (this unpickles it) and pass the copy:\n'
            f'    python -m gfl_det.checkpoint convert --trust {checkpoint} OUT.pth')


# ----------------------------------------------------------------------------------------------
# conversion (the one place that unpickles, and only when told to)
# ----------------------------------------------------------------------------------------------
def convert_trusted(src: PathLike, dst: PathLike, logger: LogFn = None) -> tuple[dict, list]:
    """Unpickle ``src`` (``weights_only=False``: RUNS ANY CODE THE FILE NAMES -- only for files
    whose source you trust) and write a plain copy to ``dst`` (:func:`to_plain`): weights,
    meta, message hub, optimizer, schedulers, ... -- everything a resume needs. What cannot be
    stored as plain data is left out and listed. The copy is proved to load with
    ``weights_only=True``. Returns ``(checkpoint written, paths left out)``."""
    src = os.fspath(src)
    if not os.path.isfile(src):
        raise FileNotFoundError(f'checkpoint not found: {src!r}')
    try:
        ckpt = torch.load(src, map_location='cpu', weights_only=False)
    except Exception as e:
        raise CheckpointError(f'checkpoint {src!r} could not be read ({type(e).__name__}: '
                              f'{_first_line(e)}); it may be truncated or corrupt') from e
    if isinstance(ckpt, nn.Module):
        ckpt = {'state_dict': ckpt.state_dict()}
    dropped: list = []
    out = to_plain(ckpt, 'checkpoint', dropped)
    if not isinstance(out, Mapping):
        raise CheckpointError(f'{src!r} holds a {type(ckpt).__name__}, not a checkpoint dict')
    split_checkpoint(out, f'checkpoint {src!r}')  # it must hold weights
    atomic_save(out, dst)
    load_untrusted(dst)  # prove it
    if dropped:
        _log(logger, f'left out of {os.fspath(dst)} (not plain data): {_head(dropped)}')
    return out, dropped


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m gfl_det.checkpoint',
                                description='Checkpoint utilities.')
    sub = p.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser(
        'convert', help='write a plain copy (loads with weights_only=True) of a pickled '
                        'checkpoint you trust, e.g. a full training checkpoint of plain mmengine '
                        '/ MMDetection, keeping the weights and the resume state')
    c.add_argument('src')
    c.add_argument('dst')
    c.add_argument('--trust', action='store_true',
                   help='unpickle SRC with weights_only=False. This RUNS ANY CODE SRC NAMES: '
                        'give it only for a file whose source you trust. Without it nothing is '
                        'unpickled.')
    args = p.parse_args(argv)
    try:
        if not args.trust:
            load_untrusted(args.src)
            print(f'{args.src} already holds plain data only (it loads with weights_only=True): '
                  'use it as it is; nothing written')
            return 0
        print(f'unpickling {args.src} with weights_only=False (--trust): any code it names runs '
              'now', file=sys.stderr)
        out, dropped = convert_trusted(args.src, args.dst, logger=lambda m: None)
    except UntrustedCheckpointError as e:  # without --trust
        print(f'error: {e}\n(convert unpickles only with --trust)', file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.dst}: plain data only (loads with weights_only=True); top-level keys '
          f'{sorted(map(str, out))}, {len(split_checkpoint(out)[0])} weights')
    if dropped:
        print(f'left out (not plain data): {_head(dropped)}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
