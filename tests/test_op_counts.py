"""What one step dispatches (issue 17's measure of launch overhead): the aten operators of a
training step, a loss call and an inference call stay at or below what they are now, counted
by ``tools/benchmark.py --count-ops``; and the criterion is captured whole by torch.compile."""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT, load_tool

R50 = str(ROOT / 'configs' / 'gfl_r50.py')
# R50, 2 images (the counts do not depend on the image size: 128x192 keeps the test quick).
# Measured with this code; before it (main at a498bb3): loss 961, train 2257, infer 587.
LIMITS = {
    ('loss', 100): 501,  # the criterion forward + backward, 100 gt per image
    # forward, loss, backward, SGD step, 10 gt: 1797 with a foreach SGD and no guard; now the
    # configs' fused SGD (1 op) in gfl_det's OptimWrapper, whose non-finite guard (~30 ops) stays
    # on the device
    ('train', 10): 1819,
    ('infer', 0): 410,  # forward + post-processing incl. NMS, BN folded (benchmark's default)
}
# What a GPU runs: the stem's separable max pool is a CPU path (14 ops for max_pool2d's 1); the
# issue's inference target is 400
GPU_PATH_INFER_LIMIT = 393


@pytest.fixture(scope='module')
def bench():
    return load_tool('benchmark')


@pytest.mark.parametrize('task,num_gt', list(LIMITS), ids=[t for t, _ in LIMITS])
def test_ops_per_iteration_do_not_grow(bench, task, num_gt):
    args = bench.parse_args([R50, '--task', task, '--device', 'cpu', '--batch', '2', '--shape', '128', '192',
                             '--num-gt', str(max(num_gt, 1)), '--iters', '1', '--warmup', '1', '--count-ops'])
    res = bench.run(args)
    limit = LIMITS[(task, num_gt)]
    assert res['ops_per_iter'] <= limit, (
        f'{task}: {res["ops_per_iter"]} aten ops per iteration, more than the {limit} reached '
        f'before (most frequent: {res["ops_top"]})')
    assert res['ops_per_iter'] > limit * 0.8, 'fewer ops than expected: lower LIMITS to keep the gain'
    # no op that makes a GPU wait for the host in a training step or a loss call; inference: only
    # post-processing's, whose output size is data (postprocess.batched_class_nms: the candidates
    # above score_thr, the max_per_img cut, the per-image counts; torchvision's NMS has its own)
    want = {'nonzero': 1, 'index (boolean mask)': 1, 'tolist': 1} if task == 'infer' else {}
    assert res['host_syncs'] == want, res['host_syncs']


def test_inference_ops_on_the_gpu_path(bench):
    args = bench.parse_args([R50, '--task', 'infer', '--device', 'cpu', '--batch', '2', '--shape', '128', '192',
                             '--iters', '1', '--warmup', '1', '--count-ops', '--fast', 'stem_pool=false'])
    res = bench.run(args)
    assert GPU_PATH_INFER_LIMIT * 0.8 < res['ops_per_iter'] <= GPU_PATH_INFER_LIMIT <= 400, res['ops_top']


def test_op_counter_counts_forward_and_backward(bench):
    x = torch.randn(4, 3, requires_grad=True)
    with bench.OpCounter() as c:
        (x.relu() * 2).sum().backward()
    assert c.counts['relu'] == 1 and c.counts['threshold_backward'] == 1 and c.counts['sum'] >= 1
    assert c.total == sum(c.counts.values()) >= 5
    assert c.host_syncs == {}
    with bench.OpCounter() as c:
        y = x[x > 0]  # a boolean mask: its size is a device value
        float(y.sum())
    assert c.host_syncs == {'index (boolean mask)': 1, '_local_scalar_dense': 1}
    with bench.OpCounter() as c:
        x.detach().tolist()  # no op dispatched on the CPU; a device->host copy on a GPU
        x.detach().numpy()
    assert c.host_syncs == {'tolist': 1, 'numpy': 1}
    assert torch.Tensor.tolist.__name__ == 'tolist'  # put back on exit
    n = torch.tensor([1, 2])
    with bench.OpCounter() as c:
        n.repeat_interleave(n, output_size=3)  # its size given: no wait
    assert c.host_syncs == {}
    with bench.OpCounter() as c:
        n.repeat_interleave(n)
    assert c.host_syncs == {'repeat_interleave (no output_size)': 1}


def test_criterion_is_captured_whole_by_torch_compile():
    """No graph break anywhere in the loss (dense masks, no ``nonzero``, no ``.item()``, host
    data only from the metas): dynamo traces it as one graph (``fullgraph=True``), with the
    same values. The eager backend checks the capture without minutes of code generation."""
    from mmengine.config import Config

    from gfl_det.models import build_detector
    bench = load_tool('benchmark')
    model = build_detector(Config.fromfile(str(ROOT / 'configs' / 'gfl_r18_synthetic.py')).model.to_dict())
    g = torch.Generator().manual_seed(0)
    B, H, W = 2, 128, 160
    metas = [dict(img_shape=(H, W), pad_shape=(H, W)) for _ in range(B)]
    targets = bench.random_gt(g, B, 10, H, W, model.num_classes)
    with torch.no_grad():
        out = model(torch.randn(B, 3, H, W, generator=g))
    torch._dynamo.reset()
    compiled = torch.compile(model.criterion, backend='eager', fullgraph=True)
    got, want = compiled(out, targets, metas), model.criterion(out, targets, metas)
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=1e-6, atol=0), k
    torch._dynamo.reset()


def test_kernel_counter_counts_launches_not_views():
    """--count-kernels on the CPU: the outermost ops that compute (a GPU launch each), not the
    views, allocations or no-op conversions, and not the ops an op runs inside itself."""
    bench = load_tool('benchmark')
    x, w = torch.randn(4, 5), torch.ones(2, 7)

    def fn():
        y = (x + 1).view(-1)[:7].unsqueeze(0)  # add: 1; view, slice, unsqueeze: none
        torch.empty(3)  # allocation: none
        y.to(torch.float32)  # no copy: none
        y.to(torch.float64)  # copies: 1
        torch.nn.functional.linear(y, w)  # 1, whatever it runs inside
        return y.sum()  # 1
    got = bench.count_kernels(fn, torch.device('cpu'))
    assert got['kernels_per_iter'] == 4, got
    assert got['kernels_top'] == {'aten::add': 1, 'aten::to': 1, 'aten::linear': 1, 'aten::sum': 1}
