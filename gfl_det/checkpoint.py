"""Checkpoint I/O that works with torch >= 2.6 (``torch.load(weights_only=True)`` by default).

Trust policy -- who may run code from a pickle:

* **Our own training checkpoints are trusted**: files our runner wrote into the work_dir
  (resume) are loaded with :func:`load_trusted` (``weights_only=False``). mmengine's full
  checkpoints hold a ``MessageHub`` (``HistoryBuffer`` objects, numpy scalars and arrays), the
  optimizer and scheduler states, ...; allow-listing those one by one for ``weights_only`` is
  an endless chase (HistoryBuffer, then numpy types, then ``builtins.getattr``), so we do not.
  The caller decides a file is its own; nothing here guesses.
* **Everything else is untrusted**: model-zoo / pretrained weights, ``--checkpoint`` of
  test/demo go through :func:`load_untrusted` (``weights_only=True``). When that refuses the
  file we raise :class:`UntrustedCheckpointError` naming the file, the object torch refused and
  the two ways on: ``trusted=True`` (``--trust-checkpoint`` on the command line) if you trust
  where it came from, or a one-time conversion to a weights-only copy::

      python -m gfl_det.checkpoint convert IN.pth OUT.pth

  We never fall back to unsafe loading on our own.

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
    'load_trusted', 'load_untrusted', 'load_checkpoint', 'split_checkpoint', 'load_weights',
    'convert_to_weights', 'PARTIAL_SAVE',
]

PathLike = Union[str, os.PathLike]
LogFn = Union[None, logging.Logger, Callable[[str], Any]]
_LOGGER = logging.getLogger(__name__)
PARTIAL_SAVE = re.compile(r'^\..+\.pth\.[^.]+\.tmp$')  # atomic_save's temp files: .NAME.XXXX.tmp


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


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def load_trusted(path: PathLike, map_location: Any = 'cpu') -> Any:
    """Load a checkpoint WE wrote (e.g. for resume from the work_dir): ``weights_only=False``.

    Only for files from a trusted source: unpickling runs whatever code the file names.
    """
    path = os.fspath(path)
    _check_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f'checkpoint {path!r} could not be read ({type(e).__name__}: '
                              f'{_first_line(e)}); it may be truncated or corrupt') from e


def load_untrusted(path: PathLike, map_location: Any = 'cpu') -> Any:
    """Load weights from elsewhere (model zoo, pretrained, ``--checkpoint``): ``weights_only=True``.

    Raises:
        UntrustedCheckpointError: the file holds objects ``weights_only`` refuses; the message
            says which and how to proceed. Never falls back to unsafe loading.
        CheckpointError: the file is unreadable (truncated, not a checkpoint).
    """
    path = os.fspath(path)
    _check_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only load failed' not in str(e).lower():
            raise CheckpointError(f'checkpoint {path!r} could not be read: {_first_line(e)}') \
                from e
        raise UntrustedCheckpointError(_untrusted_message(path, e)) from None
    except Exception as e:
        raise CheckpointError(f'checkpoint {path!r} could not be read ({type(e).__name__}: '
                              f'{_first_line(e)}); it may be truncated or corrupt') from e


def load_checkpoint(path: PathLike, map_location: Any = 'cpu', trusted: bool = False) -> Any:
    """:func:`load_trusted` if ``trusted`` else :func:`load_untrusted`."""
    return (load_trusted if trusted else load_untrusted)(path, map_location=map_location)


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path!r}')


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else repr(e)


def _untrusted_message(path: str, e: BaseException) -> str:
    m = re.search(r'WeightsUnpickler error:\s*(.*?)(?: Please use|\n|$)', str(e))
    reason = m.group(1).strip() if m else _first_line(e)
    root, ext = os.path.splitext(path)
    out = f'{root}_weights{ext or ".pth"}'
    return (
        f'refusing to load checkpoint {path!r} with weights_only=True: it holds Python objects '
        f'beyond tensors and plain containers ({reason}). Full training checkpoints (mmengine/'
        f'mmdet: message hub, optimizer, numpy values) look like this; unpickling them runs code '
        f'named by the file, so it is not done for files of unknown origin.\n'
        f'If you trust where this file came from, either\n'
        f'  * load it as trusted: trusted=True in Python, --trust-checkpoint on the command '
        f'line, or\n'
        f'  * convert it once to a weights-only copy (state_dict + plain meta) that loads '
        f'safely:\n'
        f'      python -m gfl_det.checkpoint convert {path} {out}')


# ----------------------------------------------------------------------------------------------
# state dicts into models
# ----------------------------------------------------------------------------------------------
def split_checkpoint(ckpt: Any, source: str = '<checkpoint>') -> tuple[Mapping[str, Any], dict]:
    """``(state_dict, meta)`` from a raw state dict, an mmengine/mmdet checkpoint
    (``{'state_dict', 'meta', ...}``), a ``{'model': state_dict}`` checkpoint (torchvision /
    detectron2 style) or a pickled ``nn.Module``."""
    if isinstance(ckpt, nn.Module):
        return ckpt.state_dict(), {}
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
                 strict: bool = True, map_location: Any = 'cpu', trusted: bool = False,
                 logger: LogFn = None) -> dict:
    """Load weights into ``model`` and return the checkpoint's meta.

    Args:
        model: the model (DDP-wrapped models: pass ``model.module``).
        path_or_state: checkpoint path, or an already loaded checkpoint / state dict.
        strict: every key must match with the same shape (default). With ``strict=False``
            keys missing from the checkpoint keep the model's values, unexpected keys and keys
            whose shape differs are skipped, and all three are reported through ``logger``.
        map_location: passed to ``torch.load``.
        trusted: the file comes from a trusted source (our own work_dir, or the user said so
            with ``--trust-checkpoint``): load it with ``weights_only=False``. Otherwise
            ``weights_only=True`` and :class:`UntrustedCheckpointError` if that refuses it.
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
        ckpt = load_checkpoint(source, map_location=map_location, trusted=trusted)
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


# ----------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------
def _plain(x: Any) -> Any:
    """Keep what weights_only=True can load: containers of str/int/float/bool/None/tensors.
    numpy scalars become Python numbers, numpy arrays tensors; anything else is dropped
    (returned as _DROP)."""
    if x is None or type(x) in (bool, int, float, str) or isinstance(x, torch.Tensor):
        return x
    if type(x).__module__ == 'numpy':
        if getattr(x, 'ndim', None) == 0 and hasattr(x, 'item'):
            return _plain(x.item())  # numpy scalar (np.float64 subclasses float: not enough)
        try:
            return torch.from_numpy(x.copy())
        except (TypeError, AttributeError):
            return _DROP
    for t in (bool, int, float, str):  # other subclasses (IntEnum, ...) -> the plain type
        if isinstance(x, t):
            return t(x)
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            v = _plain(v)
            if isinstance(k, (str, int)) and v is not _DROP:
                out[k] = v
        return out
    if isinstance(x, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in x]
        items = [v for v in items if v is not _DROP]
        return tuple(items) if isinstance(x, tuple) else items
    return _DROP


_DROP = object()


def convert_to_weights(src: PathLike, dst: PathLike) -> dict:
    """Write a weights-only copy of a TRUSTED checkpoint: ``{'state_dict', 'meta'}`` with the
    meta reduced to plain values (class names kept). The copy loads with weights_only=True.
    Returns the new checkpoint."""
    ckpt = load_trusted(src)
    state_dict, meta = split_checkpoint(ckpt, f'checkpoint {os.fspath(src)!r}')
    state_dict = _strip_module(state_dict)
    out = {'state_dict': OrderedDict((k, v) for k, v in state_dict.items()
                                     if isinstance(v, torch.Tensor)),
           'meta': _plain(meta)}
    atomic_save(out, dst)
    load_untrusted(dst)  # prove it
    return out


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m gfl_det.checkpoint',
                                description='Checkpoint utilities.')
    sub = p.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('convert', help='write a weights-only copy of a checkpoint you trust '
                                       '(state_dict + plain meta) that loads with '
                                       'weights_only=True')
    c.add_argument('src')
    c.add_argument('dst')
    args = p.parse_args(argv)
    try:
        out = convert_to_weights(args.src, args.dst)
    except (CheckpointError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.dst}: {len(out["state_dict"])} tensors, meta keys '
          f'{sorted(out["meta"])}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
