"""Crash-safe training: tools/train.py killed with SIGKILL at random moments, ten times, resumed
each time with ``--resume``; the end result is bit-for-bit the uninterrupted run's.

The run: the tiny synthetic config of test_engine_e2e (8 images, batch 2, 4 iterations per
epoch, random flip on -- so the data augmentation's random state matters), 12 epochs, CPU,
``--deterministic``, a fixed seed, a checkpoint per epoch and validation (with a "best"
checkpoint) after every epoch, training data loaded by 2 persistent worker processes (as the
shipped configs do: the workers of the uninterrupted run live through all 12 epochs, those of a
resumed run start fresh).

Kill moments come from a seeded generator, counted in training iterations rather than seconds
(so the test means the same on a fast or a busy machine): most rounds kill 1-8 iterations (up to
two epochs) after the process has started training plus 0-50 ms (which lands anywhere: in an
iteration, in validation, in a save); every third round instead watches the work dir and kills
as soon as a save's temp file appears, i.e. during ``atomic_save``. The run must get somewhere
between kills: several rounds resume from a later epoch than the one before (so fresh worker
processes take over from the killed run's mid-training).

After every kill: every ``*.pth`` in the work dir loads (weights_only=True) -- none is partial.
Every restart must resume from the newest complete epoch checkpoint (its log says which, and
the epoch and iteration), never a temp file, and must remove the partial files of killed saves.
The final checkpoint must equal the uninterrupted run's: weights and buffers, optimizer state,
lr-scheduler state, random generator states (``torch.equal``: no tolerance).

Nondeterminism, for the record: none is left in this setting. What it relies on (see
``GFLRunner.resume``): the RNG states are saved and restored; validation does not consume
training randomness; kills are resumed from epoch checkpoints (mmengine restarts a resumed
epoch from its first batch); every sample's augmentation is drawn from (seed, epoch, index)
(``gfl_det.data.SampleIndex``), not from generators living in the worker processes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from test_engine_e2e import ROOT, write_tiny_config

EPOCHS, ITERS_PER_EPOCH = 12, 4
KILLS = 10
TEMP = re.compile(r'^\..+\.pth\..+\.tmp$')


def start(cfg: Path, work_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    # one thread: the same arithmetic in every process, and no slowdown from oversubscribed
    # cores when something else runs beside the test
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    return subprocess.Popen([sys.executable, 'tools/train.py', str(cfg), '--work-dir', str(work_dir),
                             '--deterministic', *extra], cwd=ROOT, env=env,
                            stdout=open(log, 'w'), stderr=subprocess.STDOUT)


def latest_iter(work_dir: Path, before: set) -> int:
    """The last training iteration logged by the run started after ``before`` was listed."""
    best = 0
    for f in work_dir.glob('*/vis_data/scalars.json'):
        if f.parent.parent.name in before:
            continue
        for line in f.read_text().splitlines()[::-1]:
            try:
                rec = json.loads(line)
            except ValueError:  # the line being written
                continue
            if 'loss' in rec:
                best = max(best, rec['iter'])
                break
    return best


def epoch_checkpoints(work_dir: Path) -> dict[int, Path]:
    return {int(p.stem.split('_')[1]): p for p in work_dir.glob('epoch_*.pth')}


def test_sigkill_ten_times_then_resume_equals_uninterrupted_run(tmp_path):
    t0 = time.time()
    cfg = write_tiny_config(tmp_path / 'tiny.py', tmp_path / 'synthetic', max_epochs=EPOCHS,
                            flip=0.5, extra="visualizer = dict(type='Visualizer', "
                                            "vis_backends=[dict(type='LocalVisBackend')])\n"
                                            "train_dataloader.update(num_workers=2, "
                                            "persistent_workers=True)")
    ref = tmp_path / 'ref'
    p = start(cfg, ref, tmp_path / 'ref.log')
    assert p.wait(timeout=300) == 0, (tmp_path / 'ref.log').read_text()[-3000:]
    t_ref = time.time() - t0

    wd = tmp_path / 'killed'
    rng = np.random.default_rng(2024)
    kills, rounds, temp_left, modes, resumed_from = 0, 0, 0, [], []
    while kills < KILLS or (temp_left == 0 and rounds < KILLS + 5):
        ckpts = epoch_checkpoints(wd)
        newest = max(ckpts, default=0)
        before = {d.name for d in wd.iterdir()} if wd.is_dir() else set()
        log = tmp_path / f'round_{rounds}.log'
        p = start(cfg, wd, log, *(['--resume'] if rounds else []))
        mode = 'save' if rounds % 3 == 2 or kills >= KILLS else 'iter'
        target = newest * ITERS_PER_EPOCH + int(rng.integers(1, 2 * ITERS_PER_EPOCH + 1))
        pause = float(rng.uniform(0, 0.05))
        while p.poll() is None:
            if mode == 'save':
                if wd.is_dir() and any(TEMP.match(n) and n not in before for n in os.listdir(wd)):
                    break
                time.sleep(0.0005)
            else:
                if latest_iter(wd, before) >= target:
                    time.sleep(pause)
                    break
                time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL, \
            f'round {rounds} ended by itself before the kill:\n' + log.read_text()[-3000:]
        kills += 1
        modes.append(mode)
        text = log.read_text()

        # the restart resumed from the newest complete checkpoint (temp files never considered)
        if rounds:
            resumed_from.append(newest)
            if newest:
                assert f'Auto-resuming from the latest checkpoint {ckpts[newest]}' in text, text[-3000:]
                assert f'resumed epoch: {newest}, iter: {newest * ITERS_PER_EPOCH}' in text
                assert 'restored the random generator states' in text
            else:
                assert 'no checkpoint in' in text, text[-3000:]
            assert 'skipping checkpoint' not in text  # no corrupt file was ever found
            assert not re.search(r'(resum|Load)\w*.*\.tmp', text)
        # nothing in the work dir is partial: every checkpoint loads, weights only
        names = os.listdir(wd)
        for n in names:
            if n.endswith('.pth'):
                torch.load(wd / n, map_location='cpu', weights_only=True)
        temp_left += sum(1 for n in names if TEMP.match(n))
        rounds += 1

    # the killed runs got somewhere: resumed from several epochs, fresh workers each time
    assert len({e for e in resumed_from if e}) >= 3, resumed_from
    # the last restart runs to the end, cleaning up what killed saves left behind
    resumed_from.append(max(epoch_checkpoints(wd), default=0))
    log = tmp_path / 'final.log'
    p = start(cfg, wd, log, '--resume')
    assert p.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert not [n for n in os.listdir(wd) if TEMP.match(n)]
    assert temp_left >= 1, 'no kill landed during a save'
    logs = '\n'.join((tmp_path / f'round_{r}.log').read_text() for r in range(rounds)) + text
    assert 'partial checkpoint file(s) left by an interrupted save' in logs

    a = torch.load(ref / f'epoch_{EPOCHS}.pth', weights_only=True)
    b = torch.load(wd / f'epoch_{EPOCHS}.pth', weights_only=True)
    assert (b['meta']['epoch'], b['meta']['iter']) == (EPOCHS, EPOCHS * ITERS_PER_EPOCH)
    assert a['state_dict'].keys() == b['state_dict'].keys()
    diff = [k for k in a['state_dict'] if not torch.equal(a['state_dict'][k], b['state_dict'][k])]
    assert not diff, f'{len(diff)} tensors differ, e.g. {diff[:5]}'
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i]['momentum_buffer'], sb[i]['momentum_buffer']) for i in sa)
    assert a['param_schedulers'] == b['param_schedulers']
    for k in ('torch', 'numpy'):
        ra, rb = a['rng_state'][k], b['rng_state'][k]
        assert torch.equal(ra, rb) if k == 'torch' else torch.equal(ra['keys'], rb['keys'])
    print(f'\n{kills} kills ({modes.count("save")} during saves, {temp_left} partial files left '
          f'and later removed) in {rounds} rounds, resumed from epochs {resumed_from}; '
          f'reference run {t_ref:.0f} s, whole test {time.time() - t0:.0f} s')
