"""Resume after kill -9: the run continues from the last epoch checkpoint at the same iteration,
epoch and lr-schedule position, and ends with the same weights as a run never interrupted.

Three short runs of tools/train.py on the tiny synthetic config (subprocesses, so that the kill
is a real SIGKILL: no cleanup, no final save):
  A: 2 epochs, uninterrupted (the reference);
  B: the same, killed with SIGKILL in the middle of epoch 2 (after epoch_1.pth was written);
  C: ``--resume`` in B's work dir.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from test_engine_e2e import ROOT, scalars, write_tiny_config

KILLER = '''
import os, signal
from mmengine.hooks import Hook
from gfl_det.mm import HOOKS


@HOOKS.register_module()
class KillAtIter(Hook):
    """SIGKILL this process at the end of training iteration `iteration` (1-based)."""
    priority = 'VERY_LOW'

    def __init__(self, iteration):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def train(cfg: Path, work_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, 'tools/train.py', str(cfg), '--work-dir', str(work_dir),
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_resume_after_kill_continues_schedule(tmp_path):
    data = tmp_path / 'synthetic'
    # no flip: the data stream is then a function of the seed and the epoch only, so A and C
    # must agree exactly
    cfg = write_tiny_config(tmp_path / 'tiny.py', data, max_epochs=2, flip=0.0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), str(ROOT), os.environ.get('PYTHONPATH', '')]))

    a = tmp_path / 'A'
    ra = train(cfg, a, env=env)
    assert ra.returncode == 0, ra.stdout[-3000:] + ra.stderr[-3000:]
    ckpt_a1 = torch.load(a / 'epoch_1.pth', weights_only=True)
    per_epoch = ckpt_a1['meta']['iter']
    total = torch.load(a / 'epoch_2.pth', weights_only=True)['meta']['iter']
    assert total == 2 * per_epoch and per_epoch >= 3

    (tmp_path / 'killer.py').write_text(KILLER)
    kill_cfg = tmp_path / 'tiny_kill.py'
    kill_at = per_epoch + 2  # two iterations into epoch 2
    kill_cfg.write_text(f"_base_ = './tiny.py'\ncustom_imports = dict(imports=['gfl_det.mm', 'killer'])\n"
                        f"custom_hooks = [dict(type='KillAtIter', iteration={kill_at})]\n")
    b = tmp_path / 'B'
    rb = train(kill_cfg, b, env=env)
    assert rb.returncode == -signal.SIGKILL, rb.stdout[-3000:] + rb.stderr[-3000:]
    assert (b / 'epoch_1.pth').is_file() and not (b / 'epoch_2.pth').exists()
    killed = [r for r in scalars(b) if 'loss' in r]
    assert killed[-1]['iter'] == kill_at  # killed in epoch 2, after logging its 2nd iteration

    rc = train(cfg, b, '--resume', env=env)
    assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
    log = rc.stdout + rc.stderr
    assert f'resumed epoch: 1, iter: {per_epoch}' in log
    assert 'Auto-resuming from the latest checkpoint' in log and 'epoch_1.pth' in log

    # the same iterations, lr and losses as the uninterrupted run
    ref = {r['iter']: r for r in scalars(a) if 'loss' in r}
    resumed = [r for r in scalars(b) if 'loss' in r]
    assert [r['iter'] for r in resumed] == list(range(per_epoch + 1, total + 1))
    for r in resumed:
        assert r['epoch'] == 2
        assert r['lr'] == ref[r['iter']]['lr'], r['iter']
        assert abs(r['loss'] - ref[r['iter']]['loss']) < 1e-4, r['iter']
    # ... the same final state
    ca = torch.load(a / 'epoch_2.pth', weights_only=True)
    cb = torch.load(b / 'epoch_2.pth', weights_only=True)
    assert (cb['meta']['epoch'], cb['meta']['iter']) == (2, total)
    assert cb['param_schedulers'] == ca['param_schedulers']
    for k, v in ca['state_dict'].items():
        torch.testing.assert_close(cb['state_dict'][k], v, rtol=1e-4, atol=1e-5, msg=k)
