"""Resuming a training run: the newest complete checkpoint of a work dir, the temp files of
killed saves, and the random generators' states saved with each checkpoint (for an exact
resume).

:func:`find_latest_checkpoint` reads candidates with ``weights_only=True`` (no file's code ever
runs) and skips files that do not load (truncated by a crash, disk full, ...) with a warning;
checkpoints are written atomically by :func:`gfl_det.checkpoint.atomic_save`.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Mapping, Optional

import torch

from .checkpoint import (PARTIAL_SAVE, LogFn, PathLike, UntrustedCheckpointError, _first_line,
                         _head, _log, read_meta)

__all__ = ['find_latest_checkpoint', 'remove_partial_saves', 'capture_rng_state', 'restore_rng_state']

_CKPT_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')  # what mmengine's CheckpointHook writes


def find_latest_checkpoint(work_dir: PathLike, verify: bool = True, logger: LogFn = None,
                           accept: Optional[Callable[[dict], bool]] = None) -> Optional[str]:
    """Path of the newest complete checkpoint in ``work_dir``, or None.

    Candidates are mmengine's ``epoch_N.pth`` / ``iter_N.pth`` and whatever the
    ``last_checkpoint`` text file names -- only inside ``work_dir``: a name outside it is
    refused with a warning naming it (a moved work dir is handled by looking the file name up
    in ``work_dir``). Temp and partial files (``.epoch_3.pth.XXXX.tmp`` from
    :func:`atomic_save`, anything else) are ignored. Newest = latest modification time (then the
    larger N): a checkpoint written after ``last_checkpoint`` was last updated (a kill between
    the two writes) counts, and so does a restarted run's ``epoch_3`` over an older
    ``epoch_12``. With ``verify`` each candidate, newest first, is opened with
    ``weights_only=True`` (memory-mapped: no tensor data is read); one that fails -- truncated by
    a kill, empty -- is skipped with a warning naming it, and the next one is tried; one that
    holds Python objects raises :class:`UntrustedCheckpointError` (nothing of it runs: resume
    stops rather than silently going back past a file that may be the newest state).
    ``accept(meta)``: candidates whose meta it rejects are passed over (implies ``verify``).
    """
    work_dir = os.fspath(work_dir)
    if not os.path.isdir(work_dir):
        return None
    candidates: dict[str, tuple] = {}
    for name in os.listdir(work_dir):
        m = _CKPT_NAME.match(name)
        path = os.path.join(work_dir, name)
        if m and os.path.isfile(path):
            candidates[path] = (os.stat(path).st_mtime_ns, 0, int(m.group(2)))
    last = _read_last_checkpoint(work_dir, logger)
    if last is not None:
        candidates[last] = (os.stat(last).st_mtime_ns, 1, candidates.get(last, (0, 0, 0))[2])
    for path in sorted(candidates, key=candidates.__getitem__, reverse=True):
        if not verify and accept is None:
            return path
        try:
            meta = read_meta(path)
        except UntrustedCheckpointError as e:
            raise UntrustedCheckpointError(
                f'{e}\nIt is in the work dir {work_dir} as a checkpoint to resume from; if it is '
                'not yours, delete it (resume then takes the newest one before it).') from None
        except Exception as e:  # noqa: BLE001 -- any other failure means: not a usable checkpoint
            _log(logger, f'skipping checkpoint {path!r}: it does not load ({type(e).__name__}: '
                         f'{_first_line(e)}) -- probably truncated by an interrupted save; '
                         f'trying the previous one')
            continue
        if accept is None or accept(meta):
            return path
    return None


def remove_partial_saves(work_dir: PathLike, logger: LogFn = None) -> list[str]:
    """Delete the temp files that :func:`atomic_save` leaves behind when it is killed mid-save
    (``.epoch_3.pth.k2j4d1.tmp``); they are never loaded, this only frees their space. Call it
    only while no save can be running into ``work_dir`` (e.g. when a run resumes). Returns the
    names removed."""
    work_dir = os.fspath(work_dir)
    if not os.path.isdir(work_dir):
        return []
    removed = []
    for name in sorted(os.listdir(work_dir)):
        if PARTIAL_SAVE.match(name):
            try:
                os.unlink(os.path.join(work_dir, name))
                removed.append(name)
            except OSError:
                pass
    if removed:
        _log(logger, f'removed {len(removed)} partial checkpoint file(s) left by an interrupted '
                     f'save in {work_dir}: {_head(removed)}', logging.INFO)
    return removed


def _read_last_checkpoint(work_dir: str, logger: LogFn = None) -> Optional[str]:
    """The checkpoint that ``work_dir/last_checkpoint`` names, if it is a file inside
    ``work_dir`` (or one of that name is: the work dir was moved); a name outside is refused."""
    try:
        with open(os.path.join(work_dir, 'last_checkpoint'), encoding='utf-8') as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text:
        return None
    path = os.path.normpath(text if os.path.isabs(text) else os.path.join(work_dir, text))
    if os.path.isfile(path) and not _inside(path, work_dir):
        _log(logger, f'ignoring {os.path.join(work_dir, "last_checkpoint")}: it names {path}, '
                     f'outside the work dir {work_dir}; resume reads only the work dir\'s own '
                     f'checkpoints (to resume from that file, pass it: --resume {path})')
        path = ''
    if not os.path.isfile(path):  # work_dir moved or copied since (or refused): same name here
        path = os.path.join(work_dir, os.path.basename(text))
    return os.path.normpath(path) if os.path.isfile(path) else None


def _inside(path: str, directory: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, root]) == root


# ----------------------------------------------------------------------------------------------
# random number generator states (for an exact resume)
# ----------------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """The states of Python's ``random``, numpy's global generator, torch's CPU generator and
    (when CUDA is already initialised) every CUDA generator, as plain data and tensors only --
    so a checkpoint holding it still loads with ``weights_only=True``."""
    import random

    import numpy as np
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': {'version': version, 'internal': list(internal), 'gauss_next': gauss_next},
             'numpy': {'name': str(name), 'keys': torch.from_numpy(keys.astype(np.int64)),
                       'pos': int(pos), 'has_gauss': int(has_gauss), 'cached': float(cached)},
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> list[str]:
    """Set the generators from :func:`capture_rng_state`'s dict; returns the names restored
    (CUDA only when this process sees as many devices as the saving one did)."""
    import random

    import numpy as np
    done = []
    if 'python' in state:
        p = state['python']
        random.setstate((p['version'], tuple(p['internal']), p['gauss_next']))
        done.append('python')
    if 'numpy' in state:
        n = state['numpy']
        keys = np.asarray(torch.as_tensor(n['keys']).numpy(), dtype=np.uint32)
        np.random.set_state((n['name'], keys, n['pos'], n['has_gauss'], n['cached']))
        done.append('numpy')
    if 'torch' in state:
        torch.set_rng_state(torch.as_tensor(state['torch'], dtype=torch.uint8).cpu())
        done.append('torch')
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([torch.as_tensor(c, dtype=torch.uint8).cpu() for c in cuda])
        done.append('cuda')
    return done
