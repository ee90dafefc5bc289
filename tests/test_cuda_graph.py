"""gfl_det.fast.cuda_graph (``--cuda-graph``): what it records is free of host synchronisation
and host data, and its buffers' bookkeeping gives ``model.predict``'s detections.

On a CPU the recording is emulated: the "graph" re-runs the recorded function and copies the
results into the first run's output tensors -- the semantics of a CUDA graph's replay (same
input and output storage, updated in place). A predictor that forgot to copy an input into
its buffer, or read an output after another shape's replay, fails here. The real capture runs
where CUDA is (the last test; tools/gpu_check.sh on the GPU machine).
"""
from __future__ import annotations

import pytest
import torch

from conftest import load_tool
from gfl_det.apis import check_inference_flags, optimize_for_inference
from gfl_det.fast.cuda_graph import CudaGraphPredictor, static_detect
from gfl_det.models import build_detector


def _flat(outputs):
    cand, embed = outputs
    return list(cand) + list(embed or [])


def eager_capture(fn):
    outputs = fn()

    def replay():
        for static, new in zip(_flat(outputs), _flat(fn())):
            static.copy_(new)
    return replay, outputs


def _model(embed=False, fuse=True):
    torch.manual_seed(0)
    cfg = dict(backbone=dict(depth=18, base_channels=8, init_cfg=None), neck=dict(in_channels=[8, 16, 32, 64],
               out_channels=32), bbox_head=dict(num_classes=3, in_channels=32, feat_channels=32, stacked_convs=1),
               test_cfg=dict(score_thr=0.02))
    if embed:
        cfg['bbox_head']['embed'] = dict(dim=16, stacked_convs=1)
    m = build_detector(cfg).eval()
    with torch.no_grad():
        m.bbox_head.gfl_cls.bias.fill_(-2.0)  # plenty of candidates above score_thr: NMS has work
    if fuse:
        optimize_for_inference(m)  # BN folded, as --cuda-graph does
    return m


def _batch(B, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, H, W, generator=g)
    metas = [dict(img_shape=(H - 16 * i, W - 32 * i), scale_factor=(0.5 + 0.25 * i, 0.75 + 0.1 * seed))
             for i in range(B)]
    return x, metas


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in w:
            assert torch.equal(g[k], w[k]), k


def test_recorded_part_has_no_host_sync_and_no_host_data():
    """Inside a CUDA graph a host read fails the capture and a tensor built from host data (a
    copy from host memory) would be replayed from a stale address: the recorded part has
    neither; img_shape and the scale factors come in as device tensors."""
    bench = load_tool('benchmark')
    m = _model(embed=True)
    x, metas = _batch(2, 128, 160, 0)
    shapes = torch.tensor([mt['img_shape'] for mt in metas], dtype=torch.float32)
    inv = torch.rand(2, 2) + 0.5
    with torch.no_grad():
        static_detect(m, x, shapes, inv)  # the priors of this shape made (outside, as the warm-up does)
        with bench.OpCounter() as c:
            cand, embed = static_detect(m, x, shapes, inv)
    assert c.host_syncs == {}
    assert 'lift_fresh' not in c.counts  # torch.tensor(python data)
    B, N = cand.scores.shape
    assert cand.boxes.shape == (B, N, 4) and N == sum(min(1000, n * 3) for n in (320, 80, 20, 6, 2))
    assert embed is not None


@pytest.mark.parametrize('embed', [False, True])
def test_replayed_graphs_give_the_eager_detections(embed):
    m = _model(embed)
    pred = CudaGraphPredictor(m, record_after=1, capture=eager_capture)
    cases = [(1, 128, 160), (2, 128, 160), (1, 96, 192), (1, 128, 160), (2, 128, 160)]
    for i, (B, H, W) in enumerate(cases):
        x, metas = _batch(B, H, W, seed=i)
        for rescale in (True, False):
            got = pred(x, metas, rescale=rescale)
            want = m.predict(x, metas, rescale=rescale)  # no graphed_predict on m: the eager path
            assert sum(len(d['bboxes']) for d in want) > 0
            _assert_same(got, want)
    # (B, H, W, rescale): 1x128x160, 2x128x160, 1x96x192, each with and without rescale, recorded
    # once; the last two batches replay theirs with new images and metas
    assert pred.captures == 6 and pred.eager_calls == 0


def test_shapes_recorded_from_their_second_call_up_to_max_graphs():
    """A shape seen once runs eagerly; the second call records it; once max_graphs shapes have
    graphs, new shapes run eagerly (no graph is dropped and recorded again). Always the eager
    detections."""
    m = _model()
    pred = CudaGraphPredictor(m, max_graphs=2, capture=eager_capture)
    shapes = [(96, 160), (96, 160), (96, 160), (128, 160), (128, 160), (96, 192), (96, 192), (96, 192), (96, 160)]
    for i, (H, W) in enumerate(shapes):
        x, metas = _batch(1, H, W, seed=i)
        _assert_same(pred(x, metas), m.predict(x, metas))
    # 96x160: eager, record, replay; 128x160: eager, record; 96x192: eager x3 (two graphs already);
    # 96x160 again: replay
    assert pred.captures == 2 and pred.eager_calls == 5
    assert set(k[1:3] for k in pred.graphs) == {(96, 160), (128, 160)}


def test_cuda_graph_refusals():
    m = _model()
    with pytest.raises(ValueError, match='--cuda-graph needs the model on a CUDA device.*--device cuda'):
        optimize_for_inference(m, cuda_graph=True)
    with pytest.raises(ValueError, match='--cuda-graph cannot be combined with --compile'):
        check_inference_flags(compile=True, cuda_graph=True)
    with pytest.raises(ValueError, match='--cuda-graph cannot be combined with --winograd'):
        check_inference_flags(winograd=True, cuda_graph=True)
    pred = CudaGraphPredictor(_model(fuse=False).train(), capture=eager_capture)
    with pytest.raises(RuntimeError, match='model.eval'):
        pred(*_batch(1, 64, 64, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (tools/gpu_check.sh runs it on the GPU machine)')
def test_cuda_graph_on_the_gpu():
    m = _model(embed=True).cuda()
    pred = optimize_for_inference(m, cuda_graph=True).__dict__['graphed_predict']
    for i, (B, H, W) in enumerate([(1, 128, 160), (1, 128, 160), (2, 96, 192), (2, 96, 192), (1, 128, 160)]):
        x, metas = _batch(B, H, W, seed=i)
        got = m.predict(x.cuda(), metas)
        del m.__dict__['graphed_predict']  # the eager path
        ref = m.predict(x.cuda(), metas)
        m.__dict__['graphed_predict'] = pred
        for g, w in zip(got, ref):
            assert torch.equal(g['labels'], w['labels'])
            torch.testing.assert_close(g['bboxes'], w['bboxes'], rtol=0, atol=1e-3)
    assert pred.captures == 2 and pred.eager_calls == 2  # each shape recorded at its second call


def test_cuda_graph_flag_refused_on_a_cpu_device():
    import argparse

    from gfl_det.apis import add_inference_args, parse_inference_args
    p = argparse.ArgumentParser(prog='demo.py')
    p.add_argument('--device', default='cpu')
    add_inference_args(p)
    assert not parse_inference_args(p, []).cuda_graph
    with pytest.raises(SystemExit):
        parse_inference_args(p, ['--cuda-graph', '--device', 'cpu'])
