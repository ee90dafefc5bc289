"""``--cuda-graph``: inference with everything before NMS replayed as a CUDA graph, one graph
per input shape.

Legend: B images, (H, W) the padded batch shape, N the candidates before NMS (fixed by B, H, W).

At batch 1 an R50 GFL forward is ~400 kernel launches plus post-processing; on an H200 the GPU
finishes each faster than Python can launch the next (issue 17: 941 kernels, 10.1 ms per image,
most of it launch time). A CUDA graph records the launches once and replays them with one
call. What is recorded is :func:`static_detect`: backbone, FPN, head and
:func:`gfl_det.postprocess.gfl_candidates` (per-level top-k, decode, clip, rescale, the keep
mask) -- shapes fixed by (B, H, W), no host synchronisation, no host data: the per-image
``img_shape`` and scale factors are inputs copied into the graph's buffers. NMS, whose output
size is data, runs after the replay as in eager mode (:func:`batched_class_nms`), and the
embedding rows of an embedding branch are read at the detections from the replayed maps.

One graph per exact (B, H, W, layout): no bucketing, so every image is computed as eagerly (a
bucket's extra padding would change the features near the border). The graphs share one memory
pool; each replay's outputs are consumed (NMS copies what it keeps) before the next replay, so
a later graph reusing those blocks is harmless. Shapes are recorded from their second call, at
most ``max_graphs`` of them (:class:`CudaGraphPredictor`): a test set's rare shapes run eagerly.

A shape's recording warms up on a side stream and captures (~0.1-1 s); later calls replay. Same detections as ``model.predict`` (tests/test_cuda_graph.py replays the recorded
function eagerly on the CPU to check the buffers' bookkeeping; tools/gpu_check.sh runs the CUDA
capture).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..host import host_tensor
from ..postprocess import Candidates, inverse_scale

__all__ = ['CudaGraphPredictor', 'static_detect', 'use_cuda_graphs']


class StaticOutputs(NamedTuple):
    cand: Candidates
    embed: Optional[list[Tensor]]  # the embedding branch's maps, or None


def static_detect(model, x: Tensor, img_shapes: Tensor, inv_scale: Tensor) -> StaticOutputs:
    """The recorded part: normalised images (B, 3, H, W), ``img_shapes`` (B, 2) float32 (h, w)
    and ``inv_scale`` (B, 2) float32 on the device -> the candidates before NMS (and the
    embedding maps). Shapes depend on (B, H, W) only; no host synchronisation."""
    out = model(x)
    return StaticOutputs(model.candidates(out, img_shapes, inv_scale), out.embed)  # priors: cached per shape


class _Graph:
    """One shape's recording: input buffers, the graph, its output buffers."""

    def __init__(self, x: Tensor, img_shapes: Tensor, inv_scale: Tensor, replay: Callable[[], None],
                 outputs: StaticOutputs):
        self.x, self.img_shapes, self.inv_scale = x, img_shapes, inv_scale
        self.replay, self.outputs = replay, outputs


class CudaGraphPredictor:
    """``model.predict(x, metas, rescale)`` with :func:`static_detect` replayed as a CUDA graph.

    Which shapes get a graph: a shape is recorded the ``record_after``-th time it comes (default
    the second), up to ``max_graphs`` shapes; others run eagerly. A recording costs about three
    forward passes (two warm-up, one capture) and the graph's memory, so a shape seen once --
    the long tail of a test set's padded shapes (coco128 at 1333x800: 30 shapes for 128 images,
    the 4 commonest hold 72 %) -- is cheaper eager, and no graph is dropped and recorded again.

    ``capture(fn) -> (replay, outputs)`` records ``fn()`` once; the default records a CUDA graph.
    (A test passes one that re-runs ``fn`` eagerly, to check this class's bookkeeping on a CPU.)
    """

    def __init__(self, model, max_graphs: int = 32, record_after: int = 2,
                 capture: Optional[Callable[[Callable[[], StaticOutputs]], tuple]] = None):
        self.model, self.max_graphs, self.record_after = model, int(max_graphs), max(1, int(record_after))
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: Counter = Counter()  # calls per shape
        self._capture = capture or self._cuda_capture
        self._pool = None
        self.captures = 0  # how many shapes were recorded (for logs and tests)
        self.eager_calls = 0  # calls run without a graph

    def __call__(self, x: Tensor, metas: Sequence[dict], rescale: bool = True) -> list[dict[str, Tensor]]:
        if self.model.training:
            raise RuntimeError('--cuda-graph records inference: call model.eval() first')
        B, _, H, W = x.shape
        key = (B, H, W, x.dtype, x.is_contiguous(memory_format=torch.channels_last), rescale)
        g = self.graphs.get(key)
        if g is None:
            self.seen[key] += 1
            if self.seen[key] < self.record_after or len(self.graphs) >= self.max_graphs:
                self.eager_calls += 1
                return self.model.predict_by_feat(self.model(x), metas, rescale)
            g = self.graphs[key] = self._record(x, rescale)
        g.x.copy_(x)
        g.img_shapes.copy_(host_tensor([m['img_shape'][:2] for m in metas], x.device, torch.float32))
        if rescale:
            g.inv_scale.copy_(inverse_scale([m['scale_factor'][:2] for m in metas], x.device))
        g.replay()
        return self.model.detections(*g.outputs)  # NMS (data-sized) and embedding rows, eagerly

    def _record(self, x: Tensor, rescale: bool) -> _Graph:
        B = x.shape[0]
        sx = torch.empty_like(x).copy_(x)
        shapes = torch.empty(B, 2, device=x.device, dtype=torch.float32)
        shapes[:, 0], shapes[:, 1] = x.shape[-2], x.shape[-1]
        inv = torch.ones(B, 2, device=x.device, dtype=torch.float32)

        def fn() -> StaticOutputs:
            with torch.no_grad():
                return static_detect(self.model, sx, shapes, inv if rescale else None)
        replay, outputs = self._capture(fn)
        self.captures += 1
        return _Graph(sx, shapes, inv, replay, outputs)

    def _cuda_capture(self, fn: Callable[[], StaticOutputs]):
        if not torch.cuda.is_available() or not self._on_cuda():
            raise RuntimeError('--cuda-graph needs the model and the images on a CUDA device '
                               '(run with --device cuda, or drop --cuda-graph)')
        # warm up on a side stream (cuDNN / cuBLAS pick their algorithms and workspaces), as
        # torch.cuda.graphs' documentation asks, then record on it
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # under autocast the warm-up cached the weights' half-precision copies outside the
        # graph's memory: recorded as cache hits, a replay would read them after autocast has
        # freed them. Emptied, the casts are recorded with the rest.
        torch.clear_autocast_cache()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may touch CUDA while this one records
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode='thread_local'):
            outputs = fn()
        torch.clear_autocast_cache()
        return graph.replay, outputs

    def _on_cuda(self) -> bool:
        p = next(self.model.parameters(), None)
        return p is not None and p.is_cuda


def use_cuda_graphs(model, max_graphs: int = 32, record_after: int = 2) -> CudaGraphPredictor:
    """Make ``model.predict`` replay CUDA graphs (tools/test.py, tools/demo.py,
    tools/benchmark.py ``--cuda-graph``); BN should be folded first (``optimize_for_inference``
    does). Returns the predictor (its ``captures`` counts the shapes recorded)."""
    predictor = CudaGraphPredictor(model, max_graphs, record_after)
    model.__dict__['graphed_predict'] = predictor  # not a submodule: no state_dict entry
    return predictor
