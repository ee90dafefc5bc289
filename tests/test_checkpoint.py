"""gfl_det.checkpoint: trust policy, weight loading, atomic saves, resume discovery."""

import logging
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gfl_det.checkpoint import (CheckpointError, CheckpointMismatchError,
                                UntrustedCheckpointError, atomic_save, load_untrusted, load_weights,
                                main, to_plain)
from gfl_det.resume import find_latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """A tiny detector-shaped module: mmdet-like key names, a BN, a classifier."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.bbox_head = nn.Module()
        self.bbox_head.gfl_cls = nn.Conv2d(4, num_classes, 3)


def trained_net(num_classes=3, seed=0):
    torch.manual_seed(seed)
    net = Net(num_classes)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
        net.backbone[1].running_mean.normal_()
        net.backbone[1].num_batches_tracked.fill_(7)
    return net


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def mmengine_style_checkpoint(net, classes=('a', 'b', 'c')):
    """What mmengine's Runner.save_checkpoint writes: meta + state_dict + message hub (with
    HistoryBuffer objects and numpy values) + optimizer."""
    from mmengine.logging import HistoryBuffer
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # momentum buffers in the optimizer state
    hb = HistoryBuffer()
    hb.update(0.5)
    return {
        'meta': {'epoch': 3, 'iter': 300, 'seed': np.int64(0), 'lr': np.float64(0.01),
                 'dataset_meta': {'classes': classes, 'palette': [(1, 2, 3)] * len(classes)}},
        'state_dict': OrderedDict(net.state_dict()),
        'message_hub': {'log_scalars': {'train/loss': hb}, 'runtime_info': {'epoch': 3}},
        'optimizer': opt.state_dict(),
    }


# ----------------------------------------------------------------------------------------------
# trust policy
# ----------------------------------------------------------------------------------------------
def test_full_mmengine_checkpoint_is_refused_naming_torchs_reason_and_the_way_on(tmp_path):
    net = trained_net()
    path = tmp_path / 'epoch_3.pth'
    torch.save(mmengine_style_checkpoint(net), path)

    with pytest.raises(UntrustedCheckpointError) as ei:
        load_untrusted(path)
    msg = str(ei.value)
    assert str(path) in msg
    # torch's own reason, whatever the version's wording around it
    assert 'weights_only=True' in msg and 'GLOBAL numpy._core.multiarray.scalar' in msg
    assert 'Weights only load failed' not in msg and 'PyTorch 2.6' not in msg
    assert f'python -m gfl_det.checkpoint convert --trust {path} ' in msg  # the one way on
    assert '--trust-checkpoint' not in msg and 'trusted=True' not in msg
    assert isinstance(ei.value, CheckpointError)
    with pytest.raises(UntrustedCheckpointError):  # load_weights follows the same policy
        load_weights(Net(), path)


def test_numpy_scalar_alone_is_refused(tmp_path):
    path = tmp_path / 'w.pth'
    torch.save({'state_dict': trained_net().state_dict(), 'meta': {'x': np.float32(1.5)}}, path)
    with pytest.raises(UntrustedCheckpointError, match=r'numpy\S*scalar'):
        load_untrusted(path)


def test_to_plain_converts_what_mmengine_hands_over_and_refuses_the_rest():
    import enum
    import io
    from mmengine.logging import HistoryBuffer

    class Colour(enum.IntEnum):
        RED = 2

    sd = trained_net().state_dict()
    hb = HistoryBuffer([1.0, 2.5], [1, 2], max_length=7)
    x = {'sd': sd, 'hb': hb, 'np': np.float64(0.25), 'npi': np.int64(3), 'arr': np.arange(3),
         'set': {3, 1}, 'enum': Colour.RED, 'tup': (1, 'a'), 'size': torch.Size([2])}
    plain = to_plain(x)
    buf = io.BytesIO()
    torch.save(plain, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert back['hb'] == {'__history_buffer__': True, 'log_history': [1.0, 2.5],
                          'count_history': [1.0, 2.0], 'max_length': 7}
    assert type(back['np']) is float and back['np'] == 0.25 and type(back['npi']) is int
    assert torch.equal(back['arr'], torch.arange(3)) and back['set'] == [1, 3]
    assert type(back['enum']) is int and back['tup'] == (1, 'a') and back['size'] == (2,)
    assert back['sd']._metadata == sd._metadata and list(back['sd']) == list(sd)

    class Thing:
        pass
    with pytest.raises(CheckpointError, match=r"checkpoint\['meta'\]\['x'\]\[1\] is a .*Thing"):
        to_plain({'meta': {'x': [1, Thing()]}})
    dropped = []
    assert to_plain({'a': 1, 'b': Thing(), 'c': [Thing(), 2]}, dropped=dropped) == {'a': 1, 'c': [2]}
    assert len(dropped) == 2 and "checkpoint['b'] (" in dropped[0]


def test_plain_weights_load_untrusted(tmp_path):
    net = trained_net()
    torch.save(net.state_dict(), tmp_path / 'sd.pth')
    fresh = Net()
    meta = load_weights(fresh, tmp_path / 'sd.pth')  # untrusted by default
    assert_same_state(fresh, net)
    assert meta['classes'] is None
    assert meta['missing_keys'] == meta['unexpected_keys'] == meta['mismatched_keys'] == []


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_untrusted(tmp_path / 'nope.pth')
    path = tmp_path / 'cut.pth'
    torch.save(trained_net().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated or corrupt"):
        load_untrusted(path)


def test_convert_unpickles_only_with_trust_and_keeps_the_resume_state(tmp_path, capsys):
    from gfl_det.mm import decode_message_hub
    net = trained_net()
    src, dst = tmp_path / 'full.pth', tmp_path / 'plain.pth'
    full = mmengine_style_checkpoint(net, classes=('x', 'y', 'z'))
    torch.save(full, src)
    # without --trust: nothing is unpickled, nothing written, the way on is named
    assert main(['convert', str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert 'refusing to load' in err and 'convert --trust' in err and not dst.exists()
    # with --trust: a plain copy holding weights and the whole resume state
    assert main(['convert', '--trust', str(src), str(dst)]) == 0
    cap = capsys.readouterr()
    assert 'wrote' in cap.out and 'any code it names runs' in cap.err
    ckpt = load_untrusted(dst)
    assert set(ckpt) == {'state_dict', 'meta', 'message_hub', 'optimizer'}
    assert ckpt['meta']['lr'] == 0.01 and type(ckpt['meta']['lr']) is float
    hub = decode_message_hub(ckpt['message_hub'])
    assert hub['log_scalars']['train/loss'].current() == 0.5
    mom = full['optimizer']['state'][0]['momentum_buffer']
    assert torch.equal(ckpt['optimizer']['state'][0]['momentum_buffer'], mom)
    fresh = Net()
    meta = load_weights(fresh, dst)
    assert_same_state(fresh, net)
    assert meta['classes'] == ('x', 'y', 'z')
    # a file that is already plain: said so, nothing written
    assert main(['convert', str(dst), str(tmp_path / 'again.pth')]) == 0
    assert 'already holds plain data' in capsys.readouterr().out
    assert not (tmp_path / 'again.pth').exists()
    assert main(['convert', '--trust', str(tmp_path / 'missing.pth'), str(dst)]) == 2


# ----------------------------------------------------------------------------------------------
# load_weights
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('meta,classes', [
    ({'dataset_meta': {'classes': ['cat', 'dog', 'cow']}}, ('cat', 'dog', 'cow')),  # mmdet 3.x
    ({'CLASSES': ('cat', 'dog', 'cow')}, ('cat', 'dog', 'cow')),                    # mmdet 2.x
    ({'epoch': 1}, None),
])
def test_classes_from_meta(tmp_path, meta, classes):
    net = trained_net()
    torch.save({'state_dict': net.state_dict(), 'meta': meta}, tmp_path / 'c.pth')
    out = load_weights(Net(), tmp_path / 'c.pth')
    assert out['classes'] == classes
    for k, v in meta.items():
        assert out[k] == v


def test_module_prefix_stripped(tmp_path):
    net = trained_net()
    sd = net.state_dict()
    ddp = OrderedDict(('module.' + k, v) for k, v in sd.items())
    ddp._metadata = OrderedDict(('module.' + k if k else 'module', v)
                                for k, v in sd._metadata.items())
    torch.save({'state_dict': ddp, 'meta': {}}, tmp_path / 'ddp.pth')
    fresh = Net()
    load_weights(fresh, tmp_path / 'ddp.pth', strict=True)
    assert_same_state(fresh, net)
    fresh = Net()
    load_weights(fresh, {'model': ddp})  # in-memory, torchvision-style {'model': ...}
    assert_same_state(fresh, net)


def test_shape_mismatch_strict_is_a_clear_error_and_leaves_model_untouched(tmp_path):
    coco = trained_net(num_classes=80, seed=1)
    torch.save({'state_dict': coco.state_dict(), 'meta': {}}, tmp_path / 'coco.pth')
    model = trained_net(num_classes=3, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as ei:
        load_weights(model, tmp_path / 'coco.pth')
    msg = str(ei.value)
    assert 'coco.pth' in msg
    assert '2 key(s) with a different shape' in msg
    assert 'bbox_head.gfl_cls.weight: (80, 4, 3, 3) -> (3, 4, 3, 3)' in msg
    assert 'bbox_head.gfl_cls.bias: (80,) -> (3,)' in msg
    assert 'strict=False' in msg and '--cfg-options model.bbox_head.num_classes=80' in msg
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f'{k} changed although loading failed'


def test_shape_mismatch_non_strict_loads_the_rest_and_reports(tmp_path):
    coco = trained_net(num_classes=80, seed=1)
    model = trained_net(num_classes=3, seed=2)
    cls_before = model.bbox_head.gfl_cls.weight.clone()
    logs = []
    meta = load_weights(model, {'state_dict': coco.state_dict()}, strict=False,
                        logger=logs.append)
    assert torch.equal(model.backbone[0].weight, coco.backbone[0].weight)
    assert torch.equal(model.backbone[1].running_mean, coco.backbone[1].running_mean)
    assert torch.equal(model.bbox_head.gfl_cls.weight, cls_before)  # kept its own init
    assert meta['mismatched_keys'] == [('bbox_head.gfl_cls.weight', (80, 4, 3, 3), (3, 4, 3, 3)),
                                       ('bbox_head.gfl_cls.bias', (80,), (3,))]
    assert len(logs) == 1 and 'bbox_head.gfl_cls.bias: (80,) -> (3,)' in logs[0]


def test_missing_and_unexpected_keys(tmp_path, caplog):
    net = trained_net()
    sd = net.state_dict()
    sd.pop('backbone.0.bias')
    sd['neck.extra.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as ei:
        load_weights(Net(), sd)
    msg = str(ei.value)
    assert '1 missing key(s) (in the model, not in the checkpoint): backbone.0.bias' in msg
    assert '1 unexpected key(s) (in the checkpoint, not in the model): neck.extra.weight' in msg
    fresh = Net()
    with caplog.at_level(logging.WARNING, logger='gfl_det.checkpoint'):
        meta = load_weights(fresh, sd, strict=False)
    assert meta['missing_keys'] == ['backbone.0.bias']
    assert meta['unexpected_keys'] == ['neck.extra.weight']
    assert 'backbone.0.bias' in caplog.text and 'neck.extra.weight' in caplog.text
    assert torch.equal(fresh.backbone[0].weight, net.backbone[0].weight)


def test_checkpoint_without_num_batches_tracked_loads_strictly():
    # torchvision's ImageNet weights predate num_batches_tracked
    net = trained_net()
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith('num_batches_tracked')}
    fresh = Net()
    load_weights(fresh, sd, strict=True)
    assert torch.equal(fresh.backbone[0].weight, net.backbone[0].weight)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError,
                       match='no state dict found; top-level keys are optimizer, epoch'):
        load_weights(Net(), {'optimizer': {}, 'epoch': 1})


# ----------------------------------------------------------------------------------------------
# atomic_save
# ----------------------------------------------------------------------------------------------
class Bomb:
    def __reduce__(self):
        raise RuntimeError('cannot pickle me')


def test_atomic_save_round_trip_and_failure_keeps_old_file(tmp_path):
    path = tmp_path / 'sub' / 'ckpt.pth'
    atomic_save({'x': torch.arange(5)}, path)
    assert torch.equal(load_untrusted(path)['x'], torch.arange(5))
    old = path.read_bytes()
    with pytest.raises(RuntimeError, match='cannot pickle me'):
        atomic_save({'x': torch.zeros(1_000_000), 'y': Bomb()}, path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in path.parent.iterdir()) == ['ckpt.pth']  # no temp left
    assert (path.stat().st_mode & 0o777) == 0o644


def test_non_atomic_save_would_corrupt(tmp_path):
    """Control: plain torch.save to the target loses the old file on the same failure, so
    the test above does test something."""
    path = tmp_path / 'ckpt.pth'
    torch.save({'x': torch.arange(5)}, path)
    with pytest.raises(RuntimeError):
        torch.save({'x': torch.zeros(1_000_000), 'y': Bomb()}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


_KILL_CHILD = r'''
import os, sys
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
from gfl_det.checkpoint import atomic_save
target = sys.argv[1]
x = torch.empty(4_000_000)  # 16 MB: most of a worker's time is spent inside atomic_save

def save(step):
    x.fill_(step)
    atomic_save({'step': step, 'x': x}, target)

save(0)
print('ready', flush=True)
for line in sys.stdin:       # one line per round: fork a worker that saves until killed
    base = int(line) * 100_000
    pid = os.fork()
    if pid == 0:
        step = base
        while True:
            step += 1
            save(step)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print('reaped', flush=True)
'''


def _readline(proc, deadline):
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError('child did not answer in time')
        r, _, _ = select.select([proc.stdout], [], [], left)
        if r:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f'child exited: {proc.stderr.read()}')
            return line.strip()


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs os.fork (POSIX)')
def test_sigkill_during_atomic_save_never_corrupts(tmp_path):
    """Workers repeatedly atomic_save a 16 MB checkpoint; SIGKILL them at random moments.
    After every kill the target must load (weights_only) and be self-consistent."""
    target = tmp_path / 'latest.pth'
    proc = subprocess.Popen([sys.executable, '-c', _KILL_CHILD, str(target), str(REPO)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rng = random.Random(0)
    deadline = time.monotonic() + 60
    progressed, leftovers = 0, 0
    try:
        assert _readline(proc, deadline) == 'ready'
        for rnd in range(1, 21):  # at least 5 rounds; more until a kill has landed inside a save
            if rnd > 5 and leftovers:
                break
            proc.stdin.write(f'{rnd}\n')
            proc.stdin.flush()
            pid = int(_readline(proc, deadline))
            time.sleep(rng.uniform(0.15, 0.6))
            os.kill(pid, signal.SIGKILL)
            assert _readline(proc, deadline) == 'reaped'
            ckpt = torch.load(target, weights_only=True)  # raises if truncated
            step = ckpt['step']
            assert ckpt['x'].shape == (4_000_000,)
            assert bool((ckpt['x'] == step).all()), 'tensor and header from different saves'
            progressed += step > rnd * 100_000
            # temp files left behind prove a kill landed in the middle of a save (the directory
            # fsync after the rename can take most of a save on a loaded machine)
            leftovers = len([p for p in tmp_path.iterdir() if p.name.endswith('.tmp')])
        proc.stdin.close()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert progressed >= 3, 'workers hardly saved anything: the kills tested nothing'
    assert leftovers >= 1, 'no kill landed inside a save in 20 rounds'


# ----------------------------------------------------------------------------------------------
# find_latest_checkpoint
# ----------------------------------------------------------------------------------------------
def _write_ckpt(path, epoch, mtime):
    atomic_save({'meta': {'epoch': epoch}, 'state_dict': {'w': torch.full((1000,), epoch)}},
                path)
    os.utime(path, ns=(mtime, mtime))


def test_find_latest_skips_truncated_and_temp_files(tmp_path):
    t0 = 1_700_000_000 * 10**9
    for e in (1, 2, 3):
        _write_ckpt(tmp_path / f'epoch_{e}.pth', e, t0 + e * 10**9)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_3.pth'))
    # the newest checkpoint was truncated (killed while mmengine wrote it non-atomically)
    p3 = tmp_path / 'epoch_3.pth'
    p3.write_bytes(p3.read_bytes()[:500])
    os.utime(p3, ns=(t0 + 3 * 10**9,) * 2)
    (tmp_path / '.epoch_4.pth.abcd.tmp').write_bytes(b'partial')  # killed atomic_save
    (tmp_path / 'epoch_4.pth.part').write_bytes(b'partial')
    logs = []
    assert find_latest_checkpoint(tmp_path, logger=logs.append) == str(tmp_path / 'epoch_2.pth')
    assert len(logs) == 1 and 'epoch_3.pth' in logs[0] and 'does not load' in logs[0]
    assert find_latest_checkpoint(tmp_path, verify=False) == str(tmp_path / 'epoch_3.pth')


def test_find_latest_prefers_newest_and_handles_moved_work_dir(tmp_path):
    t0 = 1_700_000_000 * 10**9
    assert find_latest_checkpoint(tmp_path) is None
    assert find_latest_checkpoint(tmp_path / 'absent') is None
    _write_ckpt(tmp_path / 'epoch_12.pth', 12, t0)             # from an older run
    _write_ckpt(tmp_path / 'epoch_2.pth', 2, t0 + 10**9)
    _write_ckpt(tmp_path / 'epoch_3.pth', 3, t0 + 2 * 10**9)
    # last_checkpoint written by the run on another machine: absolute path that no longer exists
    (tmp_path / 'last_checkpoint').write_text('/elsewhere/work_dirs/x/epoch_2.pth\n')
    # epoch_3 complete but killed before last_checkpoint was updated: still the newest
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / 'epoch_3.pth')
    (tmp_path / 'epoch_3.pth').write_bytes(b'')
    assert find_latest_checkpoint(tmp_path, logger=lambda m: None) == str(
        tmp_path / 'epoch_2.pth')
    (tmp_path / 'last_checkpoint').write_text('')  # interrupted write of last_checkpoint
    assert find_latest_checkpoint(tmp_path, logger=lambda m: None) == str(
        tmp_path / 'epoch_2.pth')
