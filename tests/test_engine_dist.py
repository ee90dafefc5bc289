"""tools/dist_train.sh (torchrun, --launcher pytorch) with 2 processes. Without a GPU the
processes talk over gloo on the CPU, which exercises the same distributed code paths: sharded
sampling with equal step counts, metric collection across ranks, rank-0 checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from test_engine_e2e import ROOT, scalars, write_tiny_config


def test_dist_train_two_processes(tmp_path):
    cfg = write_tiny_config(tmp_path / 'tiny.py', tmp_path / 'synthetic', max_epochs=1)
    wd = tmp_path / 'work'
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(29500 + os.getpid() % 1000), PYTHON=sys.executable)
    r = subprocess.run(['bash', 'tools/dist_train.sh', str(cfg), '2', '--work-dir', str(wd)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the console header names the process count; mmengine's environment dump is in the log file
    assert '2 processes' in r.stdout + r.stderr
    logs = list(wd.glob('*/*.log'))
    assert logs and any('Distributed training: True' in f.read_text() for f in logs), logs
    ckpt = torch.load(wd / 'epoch_1.pth', weights_only=True)
    # 8 images over 2 ranks, 2 per batch: 2 steps per rank per epoch
    assert ckpt['meta']['iter'] == 2
    recs = scalars(wd)
    assert [r['iter'] for r in recs if 'loss' in r] == [1, 2]
    assert any('coco/bbox_mAP' in r for r in recs)


def test_dist_train_names_an_interpreter_without_gfl_det(tmp_path):
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\nexit 1\n')
    fake.chmod(0o755)
    r = subprocess.run(['bash', 'tools/dist_train.sh', 'configs/gfl_r18_synthetic.py', '2'], cwd=ROOT,
                       env=dict(os.environ, PYTHON=str(fake)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f'{fake} cannot import gfl_det' in r.stderr, r.stderr
