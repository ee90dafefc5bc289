"""Hostile checkpoint files on every route that reads one: no code of theirs ever runs.

Each planted file looks like a real checkpoint (the tiny model's weights, a meta dict) plus one
object whose unpickling runs ``touch MARKER`` (``os.system`` through ``__reduce__``). Every
route must refuse it -- ``weights_only=True`` everywhere -- naming the file, and MARKER must
never appear: tools/test.py, tools/demo.py, ``init_detector``, ``load_from``,
``--resume`` (auto: a planted ``epoch_99.pth``; PATH), ``last_checkpoint`` naming a file outside
the work dir (refused, named) or an odd file inside it, and ``python -m gfl_det.checkpoint
convert`` without ``--trust``. ``convert --trust`` is the one documented opt-in: there the code
runs, as its help says.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_engine_e2e import ROOT, load_tool, write_tiny_config


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('payloads')
    cfg = write_tiny_config(tmp / 'tiny.py', tmp / 'synthetic', max_epochs=1)
    from gfl_det.apis import init_detector
    from gfl_det.data import make_synthetic_coco
    make_synthetic_coco(tmp / 'synthetic', num_train=8, num_val=4, seed=0)  # as the config says
    weights = init_detector(str(cfg)).state_dict()
    return {'tmp': tmp, 'cfg': cfg, 'weights': weights}


def plant(path: Path, setup: dict, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': setup['weights'], 'meta': {'epoch': 99, 'iter': 396},
                'message_hub': {'runtime_info': {'x': Payload(marker)}}}, path)
    return path


def marker_for(setup: dict, name: str) -> Path:
    m = setup['tmp'] / f'MARKER_{name}'
    assert not m.exists()
    return m


def test_test_tool_refuses_and_runs_nothing(setup, capsys):
    marker = marker_for(setup, 'test')
    evil = plant(setup['tmp'] / 'evil_test.pth', setup, marker)
    rc = load_tool('test').main([str(setup['cfg']), str(evil), '--work-dir',
                                 str(setup['tmp'] / 'wd_test')])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f'error: refusing to load checkpoint {str(evil)!r}' in err
    assert 'GLOBAL posix.system' in err and 'convert --trust' in err  # torch's reason, the way on
    assert not marker.exists()


def test_demo_and_init_detector_refuse_and_run_nothing(setup, capsys):
    marker = marker_for(setup, 'demo')
    evil = plant(setup['tmp'] / 'evil_demo.pth', setup, marker)
    img = setup['tmp'] / 'synthetic' / 'val' / 'val_00000.jpg'
    rc = load_tool('demo').main([str(img), str(setup['cfg']), str(evil), '--out-dir',
                                 str(setup['tmp'] / 'out'), '--device', 'cpu'])
    err = capsys.readouterr().err
    assert rc == 2 and f'refusing to load checkpoint {str(evil)!r}' in err, err[-2000:]
    from gfl_det.apis import init_detector
    from gfl_det.checkpoint import UntrustedCheckpointError
    with pytest.raises(UntrustedCheckpointError, match='posix.system'):
        init_detector(str(setup['cfg']), str(evil))
    # the removed flag points at the opt-in instead of unpickling
    with pytest.raises(SystemExit):
        load_tool('demo').main([str(img), str(setup['cfg']), str(evil), '--trust-checkpoint'])
    assert f'convert --trust {evil}' in capsys.readouterr().err
    assert not marker.exists()


def train(setup: dict, work_dir: Path, *args: str, extra: str = '') -> tuple[int, str]:
    cfg = setup['cfg']
    if extra:
        cfg = setup['tmp'] / f'{work_dir.name}.py'
        cfg.write_text(f"_base_ = {str(setup['cfg'])!r}\n{extra}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    p = subprocess.run([sys.executable, 'tools/train.py', str(cfg), '--work-dir', str(work_dir),
                        *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def test_load_from_refuses_and_runs_nothing(setup):
    marker = marker_for(setup, 'load_from')
    evil = plant(setup['tmp'] / 'evil_load_from.pth', setup, marker)
    rc, out = train(setup, setup['tmp'] / 'wd_load_from', extra=f'load_from = {str(evil)!r}')
    assert rc == 2, out[-3000:]
    assert f'error: refusing to load checkpoint {str(evil)!r}' in out and 'posix.system' in out
    assert not marker.exists()


def test_resume_auto_with_a_planted_epoch_99_refuses_it_by_name(setup):
    marker = marker_for(setup, 'resume_auto')
    wd = setup['tmp'] / 'wd_resume_auto'
    evil = plant(wd / 'epoch_99.pth', setup, marker)
    rc, out = train(setup, wd, '--resume')
    assert rc == 2, out[-3000:]
    assert f'refusing to load checkpoint {str(evil)!r}' in out
    assert 'if it is not yours, delete it' in out
    assert not marker.exists()


def test_resume_path_refuses_and_runs_nothing(setup):
    marker = marker_for(setup, 'resume_path')
    evil = plant(setup['tmp'] / 'elsewhere' / 'epoch_3.pth', setup, marker)
    rc, out = train(setup, setup['tmp'] / 'wd_resume_path', '--resume', str(evil))
    assert rc == 2, out[-3000:]
    assert f'refusing to load checkpoint {str(evil)!r}' in out
    assert not marker.exists()


def test_last_checkpoint_outside_the_work_dir_is_refused_named(setup):
    """``last_checkpoint`` naming a payload outside the work dir: refused with a warning naming
    it, and resume goes on from the work dir's own files (none here: from the start)."""
    marker = marker_for(setup, 'last_outside')
    wd = setup['tmp'] / 'wd_last_outside'
    evil = plant(setup['tmp'] / 'outside' / 'epoch_1.pth', setup, marker)
    wd.mkdir()
    (wd / 'last_checkpoint').write_text(str(evil))
    rc, out = train(setup, wd, '--resume')
    assert rc == 0, out[-3000:]
    assert f'ignoring {wd / "last_checkpoint"}: it names {evil}, outside the work dir' in out
    assert 'no checkpoint in' in out and (wd / 'epoch_1.pth').is_file()
    assert not marker.exists()
    # ... and one inside the work dir under another name is read weights-only: refused
    evil_in = plant(wd / 'mine.pth', setup, marker)
    (wd / 'last_checkpoint').write_text(str(evil_in))
    os.utime(evil_in)  # the newest candidate
    rc, out = train(setup, wd, '--resume')
    assert rc == 2 and f'refusing to load checkpoint {str(evil_in)!r}' in out, out[-3000:]
    assert not marker.exists()


def test_convert_runs_the_file_only_with_trust(setup, capsys):
    from gfl_det.checkpoint import load_untrusted, main
    marker = marker_for(setup, 'convert')
    evil = plant(setup['tmp'] / 'evil_convert.pth', setup, marker)
    out = setup['tmp'] / 'converted.pth'
    assert main(['convert', str(evil), str(out)]) == 2
    err = capsys.readouterr().err
    assert 'posix.system' in err and '--trust' in err and not out.exists()
    assert not marker.exists()
    # the documented opt-in does what it says: unpickles (the payload runs), writes a plain copy
    assert main(['convert', '--trust', str(evil), str(out)]) == 0
    assert marker.exists()
    assert 'any code it names runs' in capsys.readouterr().err
    ckpt = load_untrusted(out)
    assert ckpt['message_hub']['runtime_info']['x'] == 0  # os.system's return value: plain now


def test_missing_files_are_named_before_anything_loads(setup, capsys):
    missing = setup['tmp'] / 'nowhere' / 'epoch_1.pth'
    assert load_tool('test').main([str(setup['cfg']), str(missing)]) == 2
    assert f'error: checkpoint not found: {missing}' in capsys.readouterr().err
    assert load_tool('train').main([str(setup['cfg']), '--resume', str(missing)]) == 2
    assert f'error: --resume: checkpoint not found: {missing}' in capsys.readouterr().err
    assert load_tool('train').main([str(setup['tmp'] / 'no_config.py')]) == 2
    assert 'error: config not found' in capsys.readouterr().err
