"""What tools/train.py shows: a short header, progress with ETA from the first iterations, the
environment / config / hook dump in the log file only, the grad norm without clip_grad, a
Ctrl-C that says how to continue, and a failed start whose traceback is in its log file."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_engine_e2e import write_tiny_config

ROOT = Path(__file__).resolve().parents[1]
DUMP = ('System environment:', 'Config:', 'Hooks will be executed in the following order')


def progress_config(tmp: Path) -> Path:
    """The e2e tiny config with 20 iterations per epoch (20 images, batch 1), the default
    ``interval='auto'`` (-> 4) and no clip_grad."""
    base = write_tiny_config(tmp / 'tiny_base.py', tmp / 'synthetic', max_epochs=2)
    cfg = tmp / 'progress.py'
    cfg.write_text("_base_ = './tiny_base.py'\n"
                   "synthetic = dict(num_train=20, num_val=2, seed=0)\n"
                   "train_dataloader = dict(batch_size=1, dataset=dict(synthetic=synthetic))\n"
                   "val_dataloader = dict(dataset=dict(synthetic=synthetic))\n"
                   "test_dataloader = val_dataloader\n"
                   "default_hooks = dict(logger=dict(interval='auto'))\n"
                   "optim_wrapper = dict(clip_grad=None)\n")
    assert base.is_file()
    return cfg


def wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 600) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = path.read_text()
        if re.search(pattern, text):
            return text
        if proc.poll() is not None:
            raise AssertionError(f'train.py ended (rc {proc.returncode}) before {pattern!r}:\n{text[-3000:]}')
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f'no {pattern!r} within {timeout} s')


def test_console_header_progress_grad_norm_and_ctrl_c(tmp_path):
    """One run of tools/train.py in a subprocess: the console up to the first line of epoch 2,
    then SIGINT (Ctrl-C)."""
    cfg, wd, out = progress_config(tmp_path), tmp_path / 'work', tmp_path / 'console.txt'
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    # a shell's background job ignores SIGINT, and the child would inherit that: restore it
    proc = subprocess.Popen([sys.executable, str(ROOT / 'tools' / 'train.py'), str(cfg), '--work-dir', str(wd)],
                            stdout=out.open('w'), stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(out, r'Epoch\(train\) \[2\]\[ 4/20\]', proc)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    console = out.read_text()
    assert rc == 130, console[-3000:]

    # the short header, then progress; no environment / config / hook dump
    assert f'gfl_det train: {cfg}' in console
    assert 'work dir: work\n' in console  # inside the current folder: relative
    assert 'data: train 20 images (20 iterations of 1 per epoch), val 2 images' in console
    assert 'schedule: 2 epochs = 40 iterations, validation every epoch; a log line every 4 iterations' in console
    assert 'device: cpu (' in console
    for dump in DUMP:
        assert dump not in console, dump
    first_epoch = [int(m) for m in re.findall(r'Epoch\(train\) \[1\]\[ ?(\d+)/20\]', console)]
    assert first_epoch == [1, 2, 4, 8, 12, 16, 20]  # early lines at 1 and 2, then every 4
    assert all('eta: ' in line for line in console.splitlines() if 'Epoch(train)' in line)
    assert len(console.splitlines()) < 80, len(console.splitlines())

    # the dump is in the log file, whose path the header names
    log_file = tmp_path / re.search(r'log file: (\S+)', console).group(1)
    log = log_file.read_text()
    for dump in DUMP:
        assert dump in log, dump

    # grad_norm is logged without clip_grad (computed before each optimizer step)
    recs = [json.loads(line) for line in (log_file.parent / 'vis_data' / 'scalars.json').read_text().splitlines()]
    train = [r for r in recs if 'loss' in r]
    assert [r['iter'] for r in train][:3] == [1, 2, 4]
    assert all(r['grad_norm'] > 0 for r in train)

    # Ctrl-C: how to continue, on the console and in the log
    assert 'interrupted in epoch 2' in console
    hint = re.search(r'Continue with\n\s+(.*)\n', console).group(1)
    assert hint.endswith('--resume') and str(cfg) in hint and f'--work-dir {wd}' in hint
    assert 'epoch_1.pth' in console
    assert 'Continue with' in log_file.read_text()
    assert 'Traceback' not in console


def test_failed_start_leaves_its_traceback_in_the_log(tmp_path, capsys):
    from conftest import load_tool
    cfg = write_tiny_config(tmp_path / 'tiny.py', tmp_path / 'synthetic', max_epochs=1)
    train = load_tool('train')
    # an error while the runner is built (the model's config): raised, traceback in the log
    wd = tmp_path / 'bad_model'
    with pytest.raises(ValueError, match='soft_nms'):
        train.main([str(cfg), '--work-dir', str(wd), '--cfg-options', 'model.test_cfg.nms.type=soft_nms'])
    (log,) = wd.glob('*/*.log')
    text = log.read_text()
    assert 'the run failed to start:' in text and 'Traceback (most recent call last)' in text
    assert "ValueError: test_cfg.nms: type 'soft_nms' is not implemented" in text
    # a bad dataset when training starts: a short message (exit 2), the traceback in the log
    wd = tmp_path / 'bad_data'
    assert train.main([str(cfg), '--work-dir', str(wd), '--cfg-options',
                       'train_dataloader.dataset.ann_file=missing.json']) == 2
    assert 'error: annotation file not found' in capsys.readouterr().err
    (log,) = wd.glob('*/*.log')
    text = log.read_text()
    assert 'training stopped:' in text and 'Traceback (most recent call last)' in text
    assert 'DatasetError: annotation file not found' in text


def test_auto_interval_and_console_filter():
    from gfl_det.mm.console import ConsoleFilter, auto_interval
    assert [auto_interval(n) for n in (1, 4, 5, 20, 64, 249, 250, 10000)] == [1, 1, 1, 4, 12, 49, 50, 50]
    f = ConsoleFilter()

    def rec(msg):
        return logging.LogRecord('x', logging.INFO, __file__, 0, msg, None, None)
    assert not f.filter(rec('Config:\nmodel = dict()'))
    assert not f.filter(rec('\n' + '-' * 60 + '\nSystem environment:\n    sys.platform: linux'))
    assert not f.filter(rec('Hooks will be executed in the following order:\nbefore_run:'))
    assert f.filter(rec('Epoch(train) [1][ 1/20]  lr: 1e-3  eta: 0:00:10'))
    assert f.filter(rec('the checkpoint\'s classes differ'))
