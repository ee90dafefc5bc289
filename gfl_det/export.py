"""ONNX export of a GFL detector, with pre- and post-processing inside the graph.

The graph (``tools/export_onnx.py`` writes it):

* **input** ``images``: uint8 (B, H, W, 3), **BGR**, channels last -- what ``cv2.imread`` gives,
  stacked -- already **resized** by the caller (resizing stays outside the graph: cv2's bilinear
  resize is not ONNX's ``Resize``). Dynamic export (``dynamic=True``): the config's test
  ``Resize`` (keep ratio, e.g. long edge <= 1333, short <= 800), any B, H, W; static export: exactly
  the exported (H, W), B = 1 (:meth:`OnnxDetector.prepare` stretches an image to it). All images
  of a batch share one (H, W).
* **inside**: BGR -> RGB, ``(x - mean) / std`` with the model's mean/std, zero padding of the
  normalised image to a multiple of 32 (as ``GFL.preprocess`` + ``collate``), backbone, FPN,
  head, then exactly :func:`gfl_det.postprocess.gfl_candidates` + ``batched_class_nms`` without
  the rescale: per level the best ``nms_pre`` (prior, class) pairs, the integral decode to xyxy
  boxes in input pixels, clipped to (H, W), score > ``score_thr`` and width/height > ``min_bbox_size``; with
  ``with_nms`` also class-aware NMS (ONNX ``NonMaxSuppression`` with the class dimension: exact
  per-class NMS, no coordinate offsets) and the best ``max_per_img`` per image.
* **outputs** (N = detections of the whole batch): ``boxes`` float32 (N, 4) xyxy in input pixels,
  ``scores`` float32 (N,), ``labels`` int64 (N,), ``batch_index`` int64 (N,) (the image of each
  detection). With NMS: per image best first; without: every candidate, per level best first --
  the runtime then applies class-aware NMS (IoU ``iou_threshold``) and ``max_per_img``, both in
  the file's metadata (:class:`OnnxDetector` does). To map boxes to the original image divide
  x by ``scale_x`` and y by ``scale_y`` (new size / original size). A model with an embedding
  branch also outputs ``embeddings`` float32 (N, D), each detection's unit vector: per-detection
  outputs are gathered at the kept prior index (:meth:`GFLExportGraph.per_prior_outputs`).
* opset 17; ``onnx.checker``-checked; simplified with onnxslim when it is installed. The file's
  metadata ``gfl_det`` (JSON) holds class names, the resize scale, thresholds and layout.

Deviation from ``gfl_candidates``: ``min_bbox_size`` is compared in input pixels (mmdet: after the
rescale to the original image); the default 0 gives the same result either way.
"""
from __future__ import annotations

import copy
import json
import os
import time
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.onnx.operators import shape_as_tensor

from .boxes import distance2bbox
from .postprocess import batched_class_nms, flatten_cls, integral

OPSET = 17
OUTPUTS = ('boxes', 'scores', 'labels', 'batch_index')
# --verify fails beyond these (measured differences are far below: see README, Deploy)
TOLERANCE = {'fp32': dict(box_px=0.05, score=1e-3), 'fp16': dict(box_px=2.0, score=0.02)}


def _head_outputs(model: nn.Module, x: Tensor) -> tuple[list[Tensor], list[Tensor], Optional[list[Tensor]]]:
    """Per-level (cls logits [(B, C, H_l, W_l)], box logits [(B, 4(R+1), H_l, W_l)],
    ``HeadOutputs.embed`` or None): the one place export depends on the head's output format
    (:class:`gfl_det.structures.HeadOutputs`)."""
    out = model(x)
    return out.cls, out.reg, out.embed


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (per image and class); eager: torchvision's NMS per group.

    boxes (B, N, 4) xyxy, scores (B, C, N) -> selected (S, 3) rows (image, class, box index)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_class: int, iou: float, thr: float) -> Tensor:
        import torchvision
        rows = []
        for b in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                idx = (scores[b, c] > thr).nonzero().squeeze(1)
                kept = idx[torchvision.ops.nms(boxes[b, idx], scores[b, c, idx], iou)][:max_per_class]
                rows.append(torch.stack([torch.full_like(kept, b), torch.full_like(kept, c), kept], 1))
        return torch.cat(rows) if rows else boxes.new_zeros((0, 3), dtype=torch.long)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou: float, thr: float):
        def const(v, dtype):
            return g.op('Constant', value_t=torch.tensor([v], dtype=dtype))
        # center_point_box=0 reads corners as (y1, x1, y2, x2); IoU is the same for (x1, y1, x2, y2)
        return g.op('NonMaxSuppression', boxes, scores, const(max_per_class, torch.long),
                    const(iou, torch.float32), const(thr, torch.float32))


def _dim(x: Tensor, i: int) -> Tensor:
    """Size ``i`` of ``x`` as a 0-d int64 tensor (a graph value when tracing, not a constant)."""
    return shape_as_tensor(x)[i]


class GFLExportGraph(nn.Module):
    """The exported computation (see the module docstring); runs eagerly as well."""

    def __init__(self, model: nn.Module, with_nms: bool = True, fp16: bool = False, size_divisor: int = 32):
        super().__init__()
        net = copy.deepcopy(model).float().eval()
        if isinstance(net.backbone.maxpool, nn.MaxPool2d):
            # the plain pool: gfl_det.fast.pool's separable passes would freeze the traced input
            # size in shape-dependent slicing; ONNX MaxPool is fast in every runtime
            net.backbone.maxpool = nn.MaxPool2d(3, 2, 1)
        self.net = net.half() if fp16 else net
        self.fp16, self.with_nms, self.size_divisor = fp16, with_nms, size_divisor
        head = net.bbox_head
        self.num_classes, self.reg_max, self.strides = head.num_classes, head.reg_max, list(head.strides)
        self.with_embed = getattr(head, 'embed', None) is not None
        self.register_buffer('mean', model.pixel_mean.detach().float().reshape(1, 3, 1, 1).clone())
        self.register_buffer('std', model.pixel_std.detach().float().reshape(1, 3, 1, 1).clone())
        cfg = model.test_cfg
        self.nms_pre, self.score_thr = int(cfg['nms_pre']), float(cfg['score_thr'])
        self.iou_threshold, self.max_per_img = float(cfg['nms']['iou_threshold']), int(cfg['max_per_img'])
        self.min_bbox_size = float(cfg.get('min_bbox_size', 0) or 0)

    def output_names(self) -> list[str]:
        return list(OUTPUTS) + list(self.per_prior_outputs(None, None))

    def per_prior_outputs(self, cls_levels: Optional[list[Tensor]], reg_levels: Optional[list[Tensor]],
                          embed_levels: Optional[list[Tensor]] = None) -> dict[str, Optional[Tensor]]:
        """Extra per-detection outputs, each given per prior as (B, A, D) (A = all levels' priors in
        (level, y, x) order); they are gathered at the kept detections' priors. A model with an
        embedding branch gives ``{'embeddings': (B, A, F)}``, its tower's features (run densely
        here, whatever the tower's ``norm``), which
        ``forward`` projects to (N, D) unit vectors after the gather; plain GFL none. Called
        with ``None`` arguments it must return the same names (values unused)."""
        if not self.with_embed:
            return {}
        embed = self.net.bbox_head.embed  # the tower over every location: a static graph
        return {'embeddings': None if embed_levels is None else flatten_cls(embed.dense(embed_levels))}

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 BGR (B, H, W, 3) -> normalised RGB (B, 3, Hp, Wp), zero-padded to the divisor."""
        x = images.flip(-1).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        d = self.size_divisor
        h, w = _dim(images, 1), _dim(images, 2)
        x = F.pad(x, [0, (d - w % d) % d, 0, (d - h % d) % d])
        return x.half() if self.fp16 else x

    def candidates(self, cls_levels: list[Tensor], reg_levels: list[Tensor], hw: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per level the best nms_pre (prior, class) pairs, decoded: boxes (B, N, 4), scores
        (B, N) (-1 at or below score_thr), labels (B, N), prior index (B, N) over all levels."""
        C, R = self.num_classes, self.reg_max
        all_boxes, all_scores, all_labels, all_priors = [], [], [], []
        offset = torch.zeros((), dtype=torch.long)
        for cls, reg, s in zip(cls_levels, reg_levels, self.strides):
            B, w = _dim(cls, 0), _dim(cls, 3)
            scores = cls.float().permute(0, 2, 3, 1).reshape(B, -1).sigmoid()  # (B, A_l * C)
            k = torch.clamp(_dim(scores, 1), max=self.nms_pre)
            top, ti = scores.topk(k, dim=1)  # (B, k) best first, as gfl_candidates
            prior, labels = ti // C, ti % C
            reg = reg.float().permute(0, 2, 3, 1).reshape(B, -1, 4, R + 1)
            logits = reg.gather(1, prior[..., None, None].expand(-1, -1, 4, R + 1))  # (B, k, 4, R+1)
            dist = integral(logits) * s
            points = torch.stack([prior % w, prior // w], -1).float() * s  # (B, k, 2), as make_priors
            all_boxes.append(distance2bbox(points, dist, hw))
            all_scores.append(torch.where(top > self.score_thr, top, torch.full_like(top, -1.0)))
            all_labels.append(labels)
            all_priors.append(prior + offset)
            offset = offset + _dim(cls, 2) * w
        boxes = torch.cat(all_boxes, 1)
        scores = torch.cat(all_scores, 1)
        wh = boxes[..., 2:] - boxes[..., :2]
        scores = torch.where((wh > self.min_bbox_size).all(-1), scores, torch.full_like(scores, -1.0))
        return boxes, scores, torch.cat(all_labels, 1), torch.cat(all_priors, 1)

    def nms(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Class-aware NMS, then the best max_per_img per image: (image, candidate) of each kept
        detection, per image best first."""
        classes = torch.arange(self.num_classes, device=labels.device)
        per_class = torch.where(labels[:, None, :] == classes[None, :, None], scores[:, None, :],
                                torch.full_like(scores[:, None, :], -1.0))  # (B, C, N)
        sel = _NonMaxSuppression.apply(boxes, per_class, self.max_per_img, self.iou_threshold, self.score_thr)
        img, cand = sel[:, 0], sel[:, 2]  # (S,)
        images = torch.arange(_dim(scores, 0), device=img.device)
        # (B, S): each kept detection's score in its own image's row, -1 elsewhere
        by_image = torch.where(img[None, :] == images[:, None], scores[img, cand][None, :],
                               torch.full_like(scores[:1, :1], -1.0))
        k = torch.clamp(_dim(sel, 0), max=self.max_per_img)
        top, j = by_image.topk(k, dim=1)
        row, col = (top > -0.5).nonzero().unbind(1)
        det = j[row, col]
        return img[det], cand[det]

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        x = self.preprocess(images)
        cls_levels, reg_levels, embed_levels = _head_outputs(self.net, x)
        hw = shape_as_tensor(images)[1:3].float()
        boxes, scores, labels, priors = self.candidates(cls_levels, reg_levels, hw)
        if self.with_nms:
            img, cand = self.nms(boxes, scores, labels)
        else:
            img, cand = (scores > self.score_thr).nonzero().unbind(1)
        extras = (self.per_prior_outputs(cls_levels, reg_levels, embed_levels) if self.with_embed
                  else self.per_prior_outputs(cls_levels, reg_levels))
        prior = priors[img, cand]
        rows = {k: v[img, prior] for k, v in extras.items()}
        if 'embeddings' in rows:  # the tower's features of the kept detections only -> unit embeddings
            rows['embeddings'] = self.net.bbox_head.embed.project(rows['embeddings'])
        return (boxes[img, cand], scores[img, cand], labels[img, cand], img, *(v.float() for v in rows.values()))


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def test_resize_scale(transforms) -> Optional[tuple[int, int]]:
    """The (long, short) scale of the first fixed-scale resize in test transforms (None: none)."""
    for t in getattr(transforms, 'transforms', []):
        if getattr(t, 'scale', None) is not None and getattr(t, 'ms_range', None) is None:
            return tuple(int(v) for v in t.scale)
    return None


def test_input_shape(cfg, size_divisor: int = 32) -> tuple[int, int]:
    """(H, W) of the largest landscape network input of a config's test pipeline: its Resize
    scale (long, short) -> (short, long) padded to the divisor, e.g. (1333, 800) -> (800, 1344);
    (800, 1344) when the pipeline has no fixed-scale Resize."""
    from .apis import build_test_transforms
    long, short = test_resize_scale(build_test_transforms(cfg)) or (1333, 800)
    return tuple(-(-v // size_divisor) * size_divisor for v in (short, long))


def export_onnx(model: nn.Module, out: str, shape: Optional[Sequence[int]] = None, dynamic: bool = False,
                with_nms: bool = True, fp16: bool = False, simplify: bool = True,
                graph_cls: type = GFLExportGraph) -> dict:
    """Write ``model`` (an :func:`gfl_det.apis.init_detector` model) as an ONNX file.

    Args:
        shape: (H, W) of the traced input; the static input size unless ``dynamic``. Default:
            the config's test Resize scale, (short, long), e.g. (800, 1333).
        dynamic: batch, height and width dynamic (feed keep-ratio resized images).
        with_nms: NMS and max_per_img inside the graph.
        fp16: backbone, neck and head in float16 (pre/post-processing stay float32).
        simplify: run onnxslim when it is installed.
    Returns: the metadata written to the file (plus ``path``, ``size_mb``, ``simplified``).
    """
    import onnx
    transforms = getattr(model, 'test_transforms', None)
    scale = test_resize_scale(transforms) if transforms is not None else (1333, 800)
    if shape is None:
        long, short = scale or (1333, 800)
        shape = (short, long)
    H, W = (int(v) for v in shape)
    graph = graph_cls(model, with_nms=with_nms, fp16=fp16).eval()
    names = graph.output_names()
    dummy = torch.zeros(1, H, W, 3, dtype=torch.uint8)
    axes = {n: {0: 'num_dets'} for n in names}
    if dynamic:
        axes['images'] = {0: 'batch', 1: 'height', 2: 'width'}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter: exports with NonMaxSuppression on every torch >= 2.1 this project
        # supports, in seconds; torch >= 2.9 calls it legacy (a DeprecationWarning) and its tracer
        # warns about shape arithmetic, which is meant to be traced here
        warnings.simplefilter('ignore')
        torch.onnx.export(graph, (dummy,), out, dynamo=False, opset_version=OPSET, input_names=['images'],
                          output_names=names, dynamic_axes=axes, do_constant_folding=True)
    proto = onnx.load(out)
    simplified = False
    if simplify:
        try:
            import onnxslim
        except ImportError:
            pass
        else:
            proto, simplified = onnxslim.slim(proto), True
    meta = dict(input='images: uint8 (B, H, W, 3) BGR, resized; zero-padded to 32 inside',
                outputs=names, static_shape=None if dynamic else [H, W], resize_scale=scale,
                num_classes=graph.num_classes,
                class_names=list(model.class_names) if model.class_names else None,
                with_nms=with_nms, fp16=fp16, opset=OPSET, size_divisor=graph.size_divisor,
                score_thr=graph.score_thr, nms_pre=graph.nms_pre, iou_threshold=graph.iou_threshold,
                max_per_img=graph.max_per_img, min_bbox_size=graph.min_bbox_size)
    del proto.metadata_props[:]
    proto.metadata_props.add(key='gfl_det', value=json.dumps(meta))
    onnx.checker.check_model(proto)
    onnx.save(proto, out)
    return dict(meta, path=out, size_mb=os.path.getsize(out) / 2**20, simplified=simplified)


# ---------------------------------------------------------------------------------------------
# running the file
# ---------------------------------------------------------------------------------------------
def resize_like_graph(image: np.ndarray, meta: dict) -> tuple[np.ndarray, tuple[float, float]]:
    """The resize an exported graph expects (outside it): static -- stretched to its (H, W);
    dynamic -- the config's keep-ratio test Resize. Returns (image, (scale_x, scale_y))."""
    from .data import KeepRatioResize
    image = np.ascontiguousarray(image)
    h, w = image.shape[:2]
    if meta['static_shape']:
        import cv2
        H, W = meta['static_shape']
        out = cv2.resize(image, (W, H), interpolation=cv2.INTER_LINEAR) if (h, w) != (H, W) else image
    elif meta['resize_scale']:
        out = KeepRatioResize(tuple(meta['resize_scale']))(
            {'image': image, 'boxes': np.zeros((0, 4), np.float32), 'meta': {}})['image']
    else:
        out = image
    return np.ascontiguousarray(out), (out.shape[1] / w, out.shape[0] / h)


def rescale_boxes(boxes: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Input-pixel boxes -> original-image pixels, as gfl_candidates (multiply by 1 / scale)."""
    inv = (1.0 / np.asarray(scale, np.float64)).astype(np.float32)
    return boxes.astype(np.float32) * np.concatenate([inv, inv])


class OnnxDetector:
    """An exported file in onnxruntime: ``det(image_bgr)`` -> the dict of
    :func:`gfl_det.apis.inference_detector` (boxes in the original image's pixels).

    Args:
        path: the .onnx file written by :func:`export_onnx`.
        device: 'cpu' or 'cuda' (CUDAExecutionProvider; onnxruntime-gpu).
        threads: onnxruntime intra-op threads (default: torch's thread count).
    """

    def __init__(self, path: str, device: str = 'cpu', threads: Optional[int] = None):
        import onnxruntime as ort
        if not os.path.isfile(path):
            raise FileNotFoundError(f'ONNX file not found: {path} (write one with tools/export_onnx.py)')
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3
        providers = ['CPUExecutionProvider']
        if device.startswith('cuda'):
            if 'CUDAExecutionProvider' not in ort.get_available_providers():
                raise RuntimeError('onnxruntime has no CUDAExecutionProvider here: pip install '
                                   'onnxruntime-gpu, or run with --device cpu')
            providers.insert(0, 'CUDAExecutionProvider')
        self.session = ort.InferenceSession(path, opts, providers=providers)
        props = self.session.get_modelmeta().custom_metadata_map
        if 'gfl_det' not in props:
            raise ValueError(f'{path} has no gfl_det metadata: export it with tools/export_onnx.py')
        self.meta = json.loads(props['gfl_det'])
        self.class_names = self.meta['class_names']
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch_bgr: np.ndarray) -> dict[str, np.ndarray]:
        """The graph on a (B, H, W, 3) uint8 BGR batch: its named outputs (input pixels)."""
        return dict(zip(self.output_names, self.session.run(None, {'images': batch_bgr})))

    def __call__(self, image_bgr: np.ndarray) -> dict:
        img, scale = resize_like_graph(image_bgr, self.meta)
        out = self.run(img[None])
        if not self.meta['with_nms']:
            out = self._nms(out)
        labels = out['labels'].astype(np.int64)
        return {'bboxes': rescale_boxes(out['boxes'], scale), 'scores': out['scores'], 'labels': labels,
                'class_names': [self.class_names[j] for j in labels] if self.class_names else None,
                **({'embeddings': out['embeddings']} if 'embeddings' in out else {})}

    def _nms(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Class-aware NMS and max_per_img for a graph exported without them (one image)."""
        t = {k: torch.from_numpy(v) for k, v in out.items()}
        keep = torch.ones(1, t['scores'].shape[0], dtype=torch.bool)
        rows = torch.arange(len(t['scores']))[None]  # through NMS as 'prior_idx': the kept rows
        kept = batched_class_nms(t['boxes'][None], t['scores'][None], t['labels'][None], rows, keep,
                                 self.meta['num_classes'], self.meta['iou_threshold'],
                                 self.meta['max_per_img'])[0]
        extra = {k: v[kept['prior_idx'].numpy()] for k, v in out.items() if k not in OUTPUTS}
        return {'boxes': kept['bboxes'].numpy(), 'scores': kept['scores'].numpy(),
                'labels': kept['labels'].numpy(), **extra}


def torch_detect(model: nn.Module, image_rgb: np.ndarray) -> dict[str, Tensor]:
    """The PyTorch model on one already-resized RGB image, boxes in its pixels (no rescale):
    the same batch :func:`gfl_det.apis.inference_detector` builds, without the resize."""
    from . import data as gdata
    h, w = image_rgb.shape[:2]
    sample = gdata.to_sample({'image': image_rgb, 'boxes': np.zeros((0, 4), np.float32),
                              'labels': np.zeros((0,), np.int64),
                              'meta': {'img_shape': (h, w), 'ori_shape': (h, w), 'scale_factor': (1.0, 1.0)}})
    batch = gdata.collate([sample], size_divisor=32)
    with torch.no_grad():
        x = model.preprocess(batch['inputs'], batch['metas'])
        return model.predict(x, batch['metas'], rescale=False)[0]


# ---------------------------------------------------------------------------------------------
# verification: the file beside the PyTorch model
# ---------------------------------------------------------------------------------------------
def match_detections(a: dict, b: dict) -> dict:
    """Pair the detections of two runs (same label, greedily by the smallest box difference) and
    report the largest differences. ``a``/``b``: numpy ``boxes`` (n, 4), ``scores``, ``labels``."""
    box_diff = score_diff = 0.0
    matched = 0
    for lab in np.union1d(a['labels'], b['labels']):
        ia, ib = np.flatnonzero(a['labels'] == lab), np.flatnonzero(b['labels'] == lab)
        d = np.abs(a['boxes'][ia, None, :] - b['boxes'][None, ib, :]).max(-1).astype(np.float64)  # (na, nb)
        for _ in range(min(len(ia), len(ib))):
            i, j = np.unravel_index(np.argmin(d), d.shape)
            box_diff = max(box_diff, float(d[i, j]))
            score_diff = max(score_diff, abs(float(a['scores'][ia[i]]) - float(b['scores'][ib[j]])))
            d[i, :], d[:, j] = np.inf, np.inf
            matched += 1
    return dict(max_box_diff=box_diff, max_score_diff=score_diff,
                labels_equal=bool(np.array_equal(np.sort(a['labels']), np.sort(b['labels']))),
                unmatched=len(a['labels']) + len(b['labels']) - 2 * matched)


def verify_onnx(path: str, model: nn.Module, images: Sequence[str], device: str = 'cpu') -> dict:
    """Run the exported file in onnxruntime and the PyTorch model on the same resized images
    (:func:`resize_like_graph`) and compare detections in input pixels (a graph without NMS gets
    :class:`OnnxDetector`'s NMS). Latencies: median per image after one warm-up run each (the
    PyTorch side includes its post-processing; both on ``torch.get_num_threads()`` threads).

    Returns one dict: ``max_box_diff`` (px), ``max_score_diff``, ``labels_equal``, ``num_dets``
    {onnx, torch}, ``unmatched``, ``onnx_ms``, ``torch_ms``, ``tolerance`` and ``ok`` (counts and
    labels equal, differences within :data:`TOLERANCE`)."""
    from .data import load_image
    det = OnnxDetector(path, device=device)
    tol = TOLERANCE['fp16' if det.meta['fp16'] else 'fp32']
    if not images:
        raise ValueError('verify_onnx needs at least one image')
    totals = dict(max_box_diff=0.0, max_score_diff=0.0, labels_equal=True, unmatched=0)
    counts, t_onnx, t_torch = [0, 0], [], []
    model = model.eval()
    for n, path_img in enumerate(images):
        rgb, _ = resize_like_graph(load_image(path_img), det.meta)
        bgr = np.ascontiguousarray(rgb[..., ::-1])[None]
        for _ in range(2 if n == 0 else 1):  # the first image once more, as a warm-up
            t0 = time.perf_counter()
            ref = torch_detect(model, rgb)
            t1 = time.perf_counter()
            out = det.run(bgr)
            out = out if det.meta['with_nms'] else det._nms(out)
            t2 = time.perf_counter()
        t_torch.append(t1 - t0)
        t_onnx.append(t2 - t1)
        ref = {'boxes': ref['bboxes'].numpy(), 'scores': ref['scores'].numpy(), 'labels': ref['labels'].numpy()}
        m = match_detections(out, ref)
        totals['max_box_diff'] = max(totals['max_box_diff'], m['max_box_diff'])
        totals['max_score_diff'] = max(totals['max_score_diff'], m['max_score_diff'])
        totals['labels_equal'] &= m['labels_equal']
        totals['unmatched'] += m['unmatched']
        counts[0] += len(out['scores'])
        counts[1] += len(ref['scores'])
    ok = (counts[0] == counts[1] and totals['labels_equal'] and totals['unmatched'] == 0
          and totals['max_box_diff'] <= tol['box_px'] and totals['max_score_diff'] <= tol['score'])
    return dict(onnx=path, images=len(images), **totals, num_dets=dict(onnx=counts[0], torch=counts[1]),
                onnx_ms=round(1e3 * float(np.median(t_onnx)), 1), torch_ms=round(1e3 * float(np.median(t_torch)), 1),
                threads=torch.get_num_threads(), tolerance=tol, ok=bool(ok))
