"""The non-finite guard wired into real mmengine training (gfl_det.mm.OptimWrapper), and an
exact resume (random generator states, AMP GradScaler).

Runs the real Runner in this process on the tiny synthetic config of test_engine_e2e (8 training
images, batch 2: 4 iterations per epoch). NaNs are injected by a test-only model
(``NaNInjectGFL``): a NaN loss term at chosen iterations, or a NaN gradient of one parameter
(a tensor hook), at chosen iterations.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import MessageHub

from gfl_det import mm
from gfl_det.checkpoint import load_untrusted
from gfl_det.resume import capture_rng_state
from gfl_det.guard import NonFiniteLossError

from test_engine_e2e import load_tool, scalars, write_tiny_config
from test_engine_model import batch, small_model

GRAD_PARAM = 'bbox_head.gfl_reg.bias'


@mm.MODELS.register_module(name='NaNInjectGFL', force=True)
class NaNInjectGFL(mm.GFLDetector):
    """A GFLDetector whose loss term ``term`` is NaN at the (1-based) iterations ``nan_loss_at``
    and whose gradient of ``grad_param`` is NaN at ``nan_grad_at`` (iteration = the
    MessageHub's ``iter`` + 1, as in mmengine's logs)."""

    def __init__(self, nan_loss_at=(), nan_grad_at=(), term='loss_dfl', grad_param=GRAD_PARAM,
                 big_grad_at=(), **kwargs):
        super().__init__(**kwargs)
        self.nan_loss_at, self.nan_grad_at, self.term = set(nan_loss_at), set(nan_grad_at), term
        self.big_grad_at = set(big_grad_at)
        dict(self.named_parameters())[grad_param].register_hook(self._poison_grad)

    @staticmethod
    def _iteration():
        it = MessageHub.get_current_instance().get_info('iter')
        return None if it is None else it + 1

    def _poison_grad(self, g):
        if self._iteration() in self.big_grad_at:
            return g * 1e8  # finite, but far beyond anything seen before
        return g * float('nan') if self._iteration() in self.nan_grad_at else g

    def loss(self, *args, **kwargs):
        losses = super().loss(*args, **kwargs)
        if self._iteration() in self.nan_loss_at:
            losses[self.term] = losses[self.term] * float('nan')
        return losses


class Recorder(Hook):
    """Model state dict and optimizer state before and after every training iteration."""

    priority = 'VERY_LOW'

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def _snap(runner):
        return ({k: v.detach().clone() for k, v in runner.model.state_dict().items()},
                copy.deepcopy(runner.optim_wrapper.optimizer.state_dict()['state']))

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.before[runner.iter + 1] = self._snap(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.after[runner.iter + 1] = self._snap(runner)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp('rel_train') / 'synthetic'


def tiny_cfg(tmp_path: Path, data_root: Path, max_epochs: int, model_extra: str = '',
             extra: str = '') -> Path:
    extra = (f"model = dict(type='NaNInjectGFL', {model_extra})\n" if model_extra else '') + extra
    return write_tiny_config(tmp_path / 'tiny.py', data_root, max_epochs=max_epochs, extra=extra)


def build_runner(cfg_path: Path, work_dir: Path, *args: str) -> mm.GFLRunner:
    train = load_tool('train')
    cfg = train.setup_cfg(train.parse_args([str(cfg_path), '--work-dir', str(work_dir), *args]))
    return mm.GFLRunner.from_cfg(cfg)


def log_text(work_dir: Path) -> str:
    return '\n'.join(p.read_text() for p in sorted(work_dir.glob('*/*.log')))


def states_equal(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def optim_state_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[i][k], b[i][k]) for i in a for k in a[i] if torch.is_tensor(a[i][k]))


def test_nan_loss_and_nan_gradient_steps_are_skipped_counted_and_named(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path, data_root, max_epochs=2,
                   model_extra='nan_loss_at=[3], nan_grad_at=[6]')
    wd = tmp_path / 'work'
    runner = build_runner(cfg, wd)
    rec = Recorder()
    runner.register_hook(rec)
    runner.train()

    guard = runner.optim_wrapper.guard
    assert runner.optim_wrapper._check_on_device  # the configs' fused SGD: checked on the device
    assert (guard.skipped, guard.consecutive, guard.max_consecutive) == (2, 0, 5)
    assert runner.message_hub.get_scalar('train/nonfinite_skipped').current() == 2
    # the log: one line per skipped step, naming the iteration and the term / the parameter
    text = log_text(wd)
    assert 'iteration 3: non-finite loss term(s) loss_dfl=nan; step skipped: no optimizer step, ' \
           'gradients zeroed (1 skipped so far, 1 in a row, limit 5)' in text
    assert ('iteration 6: non-finite gradient in 1 parameter(s): gradient of '
            f'{GRAD_PARAM}; step skipped') in text
    assert len(re.findall('step skipped', text)) == 2
    # ... and the count in the logged scalars, from the first skip on
    recs = {r['iter']: r for r in scalars(wd) if 'loss' in r}
    assert [recs[i].get('nonfinite_skipped') for i in range(1, 9)] == [None, None, 1, 1, 1, 2, 2, 2]
    # a skipped step's NaN loss is left out of the smoothed log values (else: NaN for 50 lines)
    assert all(math.isfinite(r[k]) for r in recs.values()
               for k in ('loss', 'loss_cls', 'loss_bbox', 'loss_dfl'))

    # a skipped step leaves the model exactly as it was: weights, BN running statistics (the
    # forward pass changed them: restored) and the optimizer's momentum
    for it in (3, 6):
        assert states_equal(rec.before[it][0], rec.after[it][0]), it
        assert optim_state_equal(rec.before[it][1], rec.after[it][1]), it
    for it in (2, 4, 7):  # ... while a normal step changes weights and BN statistics
        b, a = rec.before[it][0], rec.after[it][0]
        assert not torch.equal(b['bbox_head.gfl_cls.weight'], a['bbox_head.gfl_cls.weight'])
        assert not torch.equal(b['backbone.bn1.running_mean'], a['backbone.bn1.running_mean'])
    assert all(torch.isfinite(v).all() for v in runner.model.state_dict().values()
               if v.is_floating_point())

    # the count is part of the checkpoint (optimizer state), which still loads weights-only
    ckpt = load_untrusted(wd / 'epoch_2.pth')
    guard_state = ckpt['optimizer']['nonfinite_guard']
    assert (guard_state['skipped'], guard_state['consecutive'], guard_state['spike']) == (2, 0, None)
    assert len(guard_state['grad_history']) == 6  # the 6 good steps' largest |gradient|
    assert ckpt['meta']['clean'] is True
    assert 'rng_state' in ckpt


def test_consecutive_nonfinite_steps_stop_training_keeping_the_last_checkpoint(
        tmp_path, data_root, capsys):
    """Iterations 6, 7, 8 (epoch 2) have a NaN loss; max_consecutive=3: tools/train.py stops at
    iteration 8 with exit status 3, naming epoch_1.pth; nothing is written for epoch 2."""
    cfg = tiny_cfg(tmp_path, data_root, max_epochs=3, model_extra='nan_loss_at=[6, 7, 8]',
                   extra="optim_wrapper = dict(nonfinite_guard=dict(max_consecutive=3))\n")
    wd = tmp_path / 'work'
    rc = load_tool('train').main([str(cfg), '--work-dir', str(wd)])
    err = capsys.readouterr().err
    assert rc == 3, err[-3000:]
    assert 'error: training stopped: iteration 8: 3 consecutive steps with non-finite loss' in err
    assert 'loss_dfl=nan' in err
    assert f'The last good checkpoint is {wd / "epoch_1.pth"} (epoch 1, iteration 4)' in err
    assert 'No checkpoint was written from the broken state' in err
    assert 'The last good checkpoint is' in log_text(wd)  # the error is in the log file too
    assert sorted(p.name for p in wd.glob('*.pth')) == ['best_coco_bbox_mAP_epoch_1.pth',
                                                         'epoch_1.pth']
    assert not list(wd.glob('.*.tmp'))
    ckpt = load_untrusted(wd / 'epoch_1.pth')  # intact, loadable, finite
    assert (ckpt['meta']['epoch'], ckpt['meta']['iter']) == (1, 4)
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())
    # ... and training can go on from it
    runner = build_runner(cfg, wd, '--resume', '--cfg-options', 'model.nan_loss_at=[]')
    runner.train()
    assert load_untrusted(wd / 'epoch_3.pth')['meta']['iter'] == 12


class BreakWeights(Hook):
    """Sets one weight to ``value`` (default inf) after the given iteration (a step that
    'succeeded' with a finite but huge gradient would do that)."""

    priority = 'VERY_HIGH'

    def __init__(self, iteration, value=float('inf'), target='bbox_head.gfl_cls.bias'):
        self.iteration, self.value, self.target = iteration, value, target

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            with torch.no_grad():
                runner.model.state_dict()[self.target].view(-1)[0] = self.value


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path, data_root, max_epochs=2)
    wd = tmp_path / 'work'
    runner = build_runner(cfg, wd)
    runner.register_hook(BreakWeights(8))  # epoch 2's last iteration, before its checkpoint
    with pytest.raises(NonFiniteLossError, match=r"(?s)weights are not finite.*gfl_cls\.bias.*"
                                                  r"epoch_2\.pth was NOT written.*"
                                                  r"last good checkpoint is .*epoch_1\.pth"):
        runner.train()
    assert not (wd / 'epoch_2.pth').exists() and not list(wd.glob('.*.tmp'))


def test_the_issues_case_lr_1e6_writes_no_checkpoint_and_names_none_as_good(
        tmp_path, data_root, capsys):
    """The reported case: lr 1e6. The first steps blow the weights up, then the loss is NaN:
    the epoch ends inside a non-finite streak, so neither epoch_1.pth nor a best checkpoint is
    written (they used to be, with weights of 1e21, and named 'last good'); the guard stops."""
    cfg = tiny_cfg(tmp_path, data_root, max_epochs=3,
                   extra="optim_wrapper = dict(optimizer=dict(lr=1e6))\n")
    wd = tmp_path / 'work'
    rc = load_tool('train').main([str(cfg), '--work-dir', str(wd)])
    err = capsys.readouterr().err
    assert rc == 3, err[-3000:]
    assert 'consecutive steps with non-finite loss' in err
    assert 'No checkpoint had been saved in a clean state' in err
    assert not list(wd.glob('*.pth')) and not (wd / 'last_checkpoint').exists()
    text = log_text(wd)
    assert 'iteration 4: checkpoint NOT saved: a non-finite streak is open' in text
    assert 'iteration 4: best checkpoint (no new best chosen) NOT saved' in text


def test_skipped_steps_at_an_epochs_end_block_its_checkpoint_and_best(tmp_path, data_root, capsys):
    """NaN at iterations 7-11: epoch 2 ends (iteration 8) with 2 skipped in a row, so
    epoch_2.pth is not written and does not become best; the stop names epoch_1.pth."""
    cfg = tiny_cfg(tmp_path, data_root, max_epochs=3, model_extra='nan_loss_at=[7, 8, 9, 10, 11]')
    wd = tmp_path / 'work'
    rc = load_tool('train').main([str(cfg), '--work-dir', str(wd)])
    err = capsys.readouterr().err
    assert rc == 3, err[-3000:]
    assert f'The last good checkpoint is {wd / "epoch_1.pth"} (epoch 1, iteration 4)' in err
    assert sorted(p.name for p in wd.glob('*.pth')) == ['best_coco_bbox_mAP_epoch_1.pth',
                                                         'epoch_1.pth']
    assert (wd / 'last_checkpoint').read_text().endswith('epoch_1.pth')
    assert ('iteration 8: checkpoint NOT saved: a non-finite streak is open (2 step(s) in a row '
            'skipped up to now)') in log_text(wd)
    assert load_untrusted(wd / 'epoch_1.pth')['meta']['clean'] is True


@pytest.mark.parametrize('case', ['weights', 'gradient'])
def test_a_diverged_state_is_never_saved(tmp_path, data_root, case):
    """Finite but diverged at the end of epoch 2 -- a weight 1e6 (the model's state started
    at 16: bound 16,000), or the last step's gradient 1e8 x its usual size (bound: 1000 x the
    median) -- so epoch_2.pth is not written, no best is chosen, and the run ends with an error
    naming epoch_1.pth as the last good checkpoint."""
    extra = "optim_wrapper = dict(nonfinite_guard=dict(min_history=3))\n"
    cfg = tiny_cfg(tmp_path, data_root, max_epochs=2, extra=extra,
                   model_extra='big_grad_at=[8]' if case == 'gradient' else '')
    wd = tmp_path / 'work'
    runner = build_runner(cfg, wd)
    if case == 'weights':
        runner.register_hook(BreakWeights(8, value=1e6))
    why = (r"the weights have diverged: the largest \|value\| of the model's state 1e\+06 is over "
           r"1000x max\(1, 16\)" if case == 'weights' else
           r"iteration 8's largest \|gradient\| [\d.e+]+ is over 1000x the median [\d.e+-]+ of "
           r"the 7 steps before it")
    with pytest.raises(NonFiniteLossError, match=rf"(?s)training ended in a state that was not "
                                                 rf"saved: iteration 8: {why}.*last good checkpoint "
                                                 rf"is .*epoch_1\.pth"):
        runner.train()
    assert sorted(p.name for p in wd.glob('*.pth')) == ['best_coco_bbox_mAP_epoch_1.pth',
                                                         'epoch_1.pth']
    text = log_text(wd)
    assert 'iteration 8: checkpoint NOT saved' in text
    assert 'iteration 8: best checkpoint (no new best chosen) NOT saved' in text


def test_a_large_running_variance_is_a_scale_not_a_divergence(tmp_path, data_root):
    """A BatchNorm running variance of 1e6 is a standard deviation of 1e3: within the bound
    (16,000) where the variance itself is not; every checkpoint is written."""
    cfg = tiny_cfg(tmp_path, data_root, max_epochs=2)
    wd = tmp_path / 'work'
    runner = build_runner(cfg, wd)
    runner.register_hook(BreakWeights(8, value=1e6, target='backbone.bn1.running_var'))
    runner.train()
    assert {'epoch_1.pth', 'epoch_2.pth'} <= {p.name for p in wd.glob('*.pth')}
    assert 'NOT saved' not in log_text(wd)


# ------------------------------------------------------------------ the optim wrapper alone
def _wrapper(model, **kw):
    return mm.OPTIM_WRAPPERS.build(dict(kw, optimizer=torch.optim.SGD(model.parameters(), lr=0.01,
                                                                      momentum=0.9)))


def _model(**kw):
    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / 'configs' /
                              'gfl_r18_synthetic.py'))
    return mm.MODELS.build(dict(cfg.model, type='NaNInjectGFL', **kw))


def test_amp_float16_overflow_is_the_grad_scalers_not_counted_twice():
    """float16 AMP (GradScaler on): non-finite gradients are the scaler's (step skipped, scale
    halved, no guard count); a NaN loss is the guard's (counted, scale untouched)."""
    hub = MessageHub.get_current_instance()
    model = _model(nan_loss_at=[2], nan_grad_at=[1])
    ow = _wrapper(model, type='AmpOptimWrapper', dtype='float16', loss_scale=dict(init_scale=1024.))
    assert ow.loss_scaler.is_enabled() and not ow._guard_grads
    data = batch()
    for it, (scale, skipped) in enumerate([(512., 0), (512., 1), (512., 1)], 1):
        hub.update_info('iter', it - 1)
        before = copy.deepcopy(model.state_dict())
        model.train_step(data, ow)
        assert (ow.loss_scaler.get_scale(), ow.guard.skipped) == (scale, skipped), it
        after = model.state_dict()
        params = [k for k, _ in model.named_parameters()]
        # 1: the scaler skipped the step (weights kept; BN statistics of the forward pass kept,
        # as with any GradScaler); 2: the guard skipped it (all kept); 3: a normal step
        assert states_equal({k: before[k] for k in params}, after) == (it != 3), it
        assert states_equal(before, after) == (it == 2), it
    # bfloat16 (no loss scaling): the guard checks the gradients itself
    model = _model(nan_grad_at=[1])
    ow = _wrapper(model, type='AmpOptimWrapper', dtype='bfloat16')
    hub.update_info('iter', 0)
    model.train_step(data, ow)
    assert ow.guard.skipped == 1 and ow._guard_grads


def _fused_wrapper(model, **kw):
    """The configs' optimizer (fused SGD) in gfl_det's wrapper (``type='OptimWrapper'`` unless
    ``kw`` names another)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, fused=True)
    return mm.OPTIM_WRAPPERS.build(dict(dict(type='OptimWrapper'), **kw, optimizer=opt))


def test_guard_checked_on_the_device_skips_the_same_steps_without_a_host_sync(caplog):
    """With a fused optimizer the guard's verdict stays on the device: the optimizer gets it as
    found_inf, the BN statistics are put back with torch.where, and settle() reads the verdicts
    later. Step by step the weights, BN statistics and momentum equal those of the guard that
    reads every iteration on the host (check='step'); no op of an update after the first is one
    that makes a GPU wait for the host; the log names the same iterations and culprits."""
    counter = load_tool('benchmark').OpCounter
    hub = MessageHub.get_current_instance()
    kw = dict(nan_loss_at=[3], nan_grad_at=[5])
    torch.manual_seed(0)
    dev_model = _model(**kw)
    torch.manual_seed(0)
    host_model = _model(**kw)  # not a deepcopy: that would lose the NaN-gradient hook
    dev = _fused_wrapper(dev_model, nonfinite_guard=dict(max_consecutive=5, check='interval'))
    host = _fused_wrapper(host_model, nonfinite_guard=dict(max_consecutive=5, check='step'))
    data = batch()
    for it in range(1, 7):
        hub.update_info('iter', it - 1)
        host_model.train_step(data, host)
        with counter() as c:
            dev_model.train_step(data, dev)
        assert c.host_syncs == ({} if it > 1 else {'tolist': 1}), it  # the first reads on the host
        assert states_equal(host_model.state_dict(), dev_model.state_dict()), it
        assert optim_state_equal(host.optimizer.state_dict()['state'],
                                 dev.optimizer.state_dict()['state']), it
    assert host.guard.skipped == 2 and dev.guard.skipped == 0  # not read yet
    # its own logger: mmengine's drops a warning it has printed before (the host guard's)
    dev.guard.logger = logging.getLogger('device_guard')
    with caplog.at_level('WARNING', logger='device_guard'):
        dev.settle()
    assert dev.guard.skipped == 2 and dev.guard.consecutive == 0
    assert dev.guard.grad_history == host.guard.grad_history  # 4 good steps' largest |gradient|
    assert len(dev.guard.grad_history) == 4
    assert hub.get_scalar('train/nonfinite_skipped').current() == 2
    text = caplog.text
    assert 'iteration 3: non-finite loss term(s) loss_dfl=nan; step skipped' in text
    assert f'iteration 5: non-finite gradient in 1 parameter(s): gradient of {GRAD_PARAM}' in text
    assert dev.state_dict()['nonfinite_guard'] == host.state_dict()['nonfinite_guard']


def test_float16_guard_on_the_device_equals_the_host_one():
    """float16 AMP with a fused SGD: the GradScaler's overflow (NaN gradient, iteration 1) and the
    guard's NaN loss (iteration 3) are skipped inside the fused kernel, with no host sync after
    the first step; weights, statistics, momentum, the scaler's scale and growth tracker equal
    the guard that reads on the host at every step; the NaN loss is counted once read."""
    counter = load_tool('benchmark').OpCounter
    hub = MessageHub.get_current_instance()
    kw = dict(nan_grad_at=[2], nan_loss_at=[4])
    wrappers, models = [], []
    for check in ('interval', 'step'):
        torch.manual_seed(0)
        models.append(_model(**kw))
        wrappers.append(_fused_wrapper(models[-1], type='AmpOptimWrapper', dtype='float16',
                                       loss_scale=dict(init_scale=1024., growth_interval=2),
                                       nonfinite_guard=dict(check=check)))
    dev, host = wrappers
    data = batch()
    scales = []
    for it in range(1, 7):
        hub.update_info('iter', it - 1)
        models[1].train_step(data, host)
        with counter() as c:
            models[0].train_step(data, dev)
        assert c.host_syncs == ({} if it > 1 else {'tolist': 1}), (it, c.host_syncs)
        assert states_equal(models[1].state_dict(), models[0].state_dict()), it
        assert optim_state_equal(host.optimizer.state_dict()['state'], dev.optimizer.state_dict()['state']), it
        assert dev.loss_scaler.state_dict() == host.loss_scaler.state_dict(), it
        scales.append(dev.loss_scaler.get_scale())
    # 1, 2 grow-or-overflow as the scaler decides; the NaN loss at 4 leaves the scale alone
    assert scales[1] == scales[0] / 2 and scales[3] == scales[2]
    dev.settle()
    assert dev.guard.skipped == host.guard.skipped == 1


def test_guard_checked_on_the_device_with_accumulation_skips_the_whole_window():
    """accumulative_counts=2: a NaN loss in the first micro-batch of a window (iteration 3)
    skips that window's step -- weights and momentum as after iteration 2 -- and the next
    window steps normally; the bad micro-batch is counted once read."""
    hub = MessageHub.get_current_instance()
    model = _model(nan_loss_at=[3])
    ow = _fused_wrapper(model, accumulative_counts=2, nonfinite_guard=dict(check='interval'))
    ow.initialize_count_status(model, 0, 6)
    snaps = {}
    for it in range(1, 7):
        hub.update_info('iter', it - 1)
        model.train_step(batch(), ow)
        snaps[it] = (copy.deepcopy(model.state_dict()), copy.deepcopy(ow.optimizer.state_dict()['state']))
    assert states_equal(snaps[2][0], snaps[4][0]) and optim_state_equal(snaps[2][1], snaps[4][1])
    assert not states_equal(snaps[4][0], snaps[6][0])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    ow.settle()
    assert ow.guard.skipped == 1


def test_guard_checked_on_the_device_stops_when_read_naming_the_streaks_iteration():
    hub = MessageHub.get_current_instance()
    model = _model(nan_loss_at=[3, 4, 5])
    ow = _fused_wrapper(model, nonfinite_guard=dict(max_consecutive=2))
    assert ow._check_on_device  # 'auto' with a fused optimizer
    for it in range(1, 7):  # training goes on, harmlessly: the bad steps change nothing
        hub.update_info('iter', it - 1)
        model.train_step(batch(), ow)
    with pytest.raises(NonFiniteLossError, match='iteration 4: 2 consecutive steps.*loss_dfl=nan'):
        ow.settle()


class CountHostReads(Hook):
    """Counts, per training iteration, the ops that would make a GPU wait for the host, from the
    last hook before the step to the first hook after it (the data preprocessor, forward, loss,
    backward, the guard and the optimizer step; not the loading of the batch)."""

    priority = 'HIGHEST'  # after_train_iter: before DeferredRuntimeInfoHook's flush

    def __init__(self, counter_type):
        self.counter_type, self.reads = counter_type, {}

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._counter = self.counter_type()
        self._counter.__enter__()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._counter.__exit__(None, None, None)
        self.reads[runner.iter + 1] = self._counter.host_syncs



def test_a_real_training_iteration_reads_nothing_on_the_host(tmp_path, data_root):
    """tools/train.py's loop on the synthetic config (fused SGD, guard on, clip_grad, logging
    every iteration): after the first iteration (the guard's one read on the host) no
    iteration has an op that makes a GPU wait for the host -- the non-finite guard included."""
    cfg = tiny_cfg(tmp_path, data_root, max_epochs=1)
    runner = build_runner(cfg, tmp_path / 'work')
    hook = CountHostReads(load_tool('benchmark').OpCounter)
    runner.register_hook(hook, priority='HIGHEST')
    runner.train()
    assert list(hook.reads) == [1, 2, 3, 4]
    assert hook.reads[1] == {'tolist': 1}
    assert all(hook.reads[i] == {} for i in (2, 3, 4)), hook.reads


def test_guard_reads_on_the_host_after_resuming_an_optimizer_that_was_not_fused():
    """A checkpoint of a foreach SGD brings fused=False back into the parameter groups: the
    optimizer then refuses found_inf, so the guard reads its flag on the host again."""
    hub = MessageHub.get_current_instance()
    model = _model(nan_loss_at=[2])
    old = _wrapper(model, type='OptimWrapper')  # not fused
    hub.update_info('iter', 0)
    model.train_step(batch(), old)
    ow = _fused_wrapper(model)
    ow.load_state_dict(old.state_dict())
    assert not ow._can_check_on_device()
    hub.update_info('iter', 1)
    model.train_step(batch(), ow)  # a NaN step: skipped and counted at once
    assert ow.guard.skipped == 1 and ow.step_skipped


def test_guard_check_interval_needs_a_fused_optimizer():
    model = _model()
    with pytest.raises(ValueError, match=r"add fused=True to optim_wrapper\.optimizer"):
        _wrapper(model, type='OptimWrapper', nonfinite_guard=dict(check='interval'))
    assert not _wrapper(model, type='OptimWrapper')._check_on_device  # auto: reads every step


def test_guard_can_be_turned_off_and_is_on_by_default():
    model = _model(nan_loss_at=[1])
    MessageHub.get_current_instance().update_info('iter', 0)
    ow = _wrapper(model, type='OptimWrapper', nonfinite_guard=None)
    assert ow.guard is None
    model.train_step(batch(), ow)  # mmengine's behaviour: the NaN goes into the weights
    assert not torch.isfinite(model.bbox_head.gfl_reg.weight).all()
    assert _wrapper(small_model(), type='OptimWrapper').guard.max_consecutive == 5


# ------------------------------------------------------------------ exact resume
class StateAtStart(Hook):
    """The random generators' and the GradScaler's states when training starts (after resume)."""

    def before_train(self, runner):
        self.rng = capture_rng_state()
        self.scaler = dict(runner.optim_wrapper.loss_scaler.state_dict())


def test_resume_restores_rng_and_grad_scaler_states(tmp_path, data_root):
    amp = ("optim_wrapper = dict(type='AmpOptimWrapper', dtype='float16', "
           "loss_scale=dict(init_scale=1024., growth_interval=3))\n")
    cfg = tiny_cfg(tmp_path, data_root, max_epochs=1, extra=amp)
    wd = tmp_path / 'work'
    build_runner(cfg, wd).train()
    ckpt = torch.load(wd / 'epoch_1.pth', weights_only=True)
    saved = ckpt['optimizer']['loss_scaler']
    assert saved['scale'] != 1024. or saved['_growth_tracker'] != 0  # it moved in 4 steps

    runner = build_runner(cfg, wd, '--resume', '--cfg-options', 'train_cfg.max_epochs=2')
    hook = StateAtStart()
    runner.register_hook(hook)
    runner.train()
    assert hook.scaler == saved
    rng = ckpt['rng_state']
    assert hook.rng['python'] == rng['python'] and hook.rng['numpy']['pos'] == rng['numpy']['pos']
    assert torch.equal(hook.rng['numpy']['keys'], rng['numpy']['keys'])
    assert torch.equal(hook.rng['torch'], rng['torch'])
    assert 'restored the random generator states (python, numpy, torch)' in log_text(wd)
    # mmengine alone would have re-seeded: the saved states are not the seed's
    torch.manual_seed(0)
    assert not torch.equal(torch.get_rng_state(), rng['torch'])


def test_two_runs_started_in_the_same_second_keep_their_own_log_and_message_hub(
        tmp_path, data_root, monkeypatch):
    """mmengine names the logger and MessageHub after config + start second and reuses an
    existing instance of that name: two runners in one process in the same second shared a
    log file (test.py's numbers went into train.py's log). Ours get distinct names."""
    import mmengine.runner.runner as mr
    monkeypatch.setattr(mr.time, 'strftime', lambda fmt, t=None: '20261123_120000')
    cfg = tiny_cfg(tmp_path, data_root, max_epochs=1)
    a = build_runner(cfg, tmp_path / 'a')
    b = build_runner(cfg, tmp_path / 'b')
    assert a.experiment_name != b.experiment_name
    assert a.logger is not b.logger and a.message_hub is not b.message_hub
    a.logger.info('from run a')
    b.logger.info('from run b')
    la, lb = log_text(tmp_path / 'a'), log_text(tmp_path / 'b')
    assert 'from run a' in la and 'from run b' not in la
    assert 'from run b' in lb and 'from run a' not in lb
