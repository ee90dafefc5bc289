#!/usr/bin/env python
"""Time a GFL task on random data: a training step, inference, or the head loss alone.

    python tools/benchmark.py configs/gfl_r50.py --task train --device cpu --batch 2 --shape 800 1216 \
        --num-gt 10 --iters 3 [--amp] [--channels-last] [--compile] [--json]

Warm-up iterations are excluded; prints median / min / max seconds per iteration, images/s
and peak memory; ``--count-ops`` also the aten operators one iteration dispatches (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS).
Weights are random unless --checkpoint. For --task infer/loss the classifier is given the
same "realistic" random init as MMDetection's reference benchmark (../shared/mmdet_ref/
bench_cpu.py: cls bias ~ N(-5.25, 0.5)) so that thousands of (prior, class) pairs pass the
score threshold and NMS has real work, as with a trained model.
--task loss times the criterion (priors, ATSS, targets, QFL/GIoU/DFL, normalisers) forward and
backward to the head outputs, as MMDetection's ``GFLHead.loss_by_feat``.
"""
from __future__ import annotations

import argparse
import collections
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gfl_det.models import build_detector  # noqa: E402
from gfl_det.structures import HeadOutputs, Targets  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file (its model is built with random weights unless --checkpoint)")
    p.add_argument("--task", choices=["train", "infer", "loss"], default="train",
                   help="train: one SGD step (forward, loss, backward, update); infer: forward + post-processing "
                        "incl. NMS; loss: the head loss alone, forward and backward (default train)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch", type=int, default=2, help="images per iteration (default 2)")
    p.add_argument("--shape", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"),
                   help="input height and width of the random images (default 800 1216)")
    p.add_argument("--num-gt", type=int, default=10, help="random ground-truth boxes per image (default 10)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    p.add_argument("--amp", nargs="?", const="auto", default=None, choices=["auto", "bf16", "fp16"],
                   help="autocast dtype (auto: bf16 on CPU, bf16 on CUDA when supported)")
    p.add_argument("--channels-last", action="store_true",
                   help="weights and batches in the NHWC memory layout (faster CPU convolutions)")
    p.add_argument("--compile", action="store_true",
                   help="infer: compile_for_inference (BN folded, inductor freezing, dynamic shapes, as "
                        "tools/test.py --compile); train/loss: torch.compile of backbone, neck and head. "
                        "The compilation falls in the warm-up (reported as warmup_s)")
    p.add_argument("--compile-mode", default=None,
                   help="infer --compile: torch.compile's mode, e.g. reduce-overhead (inductor's CUDA graphs, one "
                        "per input size) or max-autotune-no-cudagraphs (default: torch's default)")
    p.add_argument("--compile-loss", action="store_true",
                   help="train/loss: model.fast.compile_loss -- the criterion's GFL terms through torch.compile, "
                        "one compilation for every image shape (gfl_det/fast/compile_loss.py), so a GPU runs them as "
                        "a few dozen fused kernels instead of ~500 ops. CPU (R50, 2 x 512x768, 100 gt): 13 s to "
                        "compile, then 22-24 ms per call as eager; --count-kernels 27 vs 337. Compilation falls in the "
                        "warm-up")
    p.add_argument("--no-fuse", action="store_true", help="infer: keep BN separate (default folds it into convs)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="infer: everything before NMS replayed as a CUDA graph per input shape (as tools/test.py "
                        "--cuda-graph; the capture falls in the warm-up)")
    p.add_argument("--winograd", action="store_true",
                   help="infer: 3x3 stride-1 convs as NNPACK Winograd (CPU, batch 1; as tools/test.py --winograd)")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default mmap/trim thresholds (the tools otherwise keep freed memory "
                        "mapped: gfl_det/fast/malloc.py); shows what that setting is worth")
    p.add_argument("--fast", nargs="+", default=[], metavar="KEY=BOOL",
                   help="gfl_det/fast/ switches (the config's model.fast), e.g. fused_qfl=true stem_pool=false")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, as tools/train.py, e.g. model.backbone.with_cp=True")
    p.add_argument("--checkpoint", help="weights to load (default: random)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, images and boxes (default 0)")
    p.add_argument("--count-ops", action="store_true",
                   help="after the timed iterations, run one more under a TorchDispatchMode counter and print the "
                        "aten operators it dispatched (every kernel call a GPU would launch, views included): per "
                        "training step (forward, loss, backward, optimizer step), per loss call (forward + backward) "
                        "or per inference call (forward + post-processing); --json adds ops_per_iter, view_ops_per_iter "
                        "(those only making a view: no kernel), ops_top and host_syncs (the ops among them that "
                        "make a GPU wait for the host: .item(), nonzero, ...)")
    p.add_argument("--count-kernels", action="store_true",
                   help="after the timed iterations, profile one more (torch.profiler) and count what it launches: "
                        "on CUDA the kernels, memcpys and memsets the GPU ran; on the CPU the outermost aten ops and "
                        "inductor's generated kernels -- unlike --count-ops this sees inside torch.compile'd code "
                        "(--compile-loss: a few dozen fused kernels instead of ~500 ops); --json adds "
                        "kernels_per_iter and kernels_top")
    p.add_argument("--sync-check", action="store_true",
                   help="CUDA: after the timed iterations, run one more training step / loss call / inference forward "
                        "(without post-processing, whose NMS needs one sync) under torch.cuda.set_sync_debug_mode"
                        "('error'): any host synchronisation inside raises; --json adds sync_free and, if not, "
                        "sync_error and sync_at (where it happened)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    return p.parse_args(argv)


SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim",
                      "unique_consecutive"})  # and repeat_interleave without output_size (see __torch_dispatch__)


# --count-kernels on the CPU: outermost ops that launch no kernel on a GPU (besides views: those
# aten marks is_view, as OpCounter counts them), or only when they copy
ALLOCATION_OPS = frozenset({"empty", "empty_like", "empty_strided", "_unsafe_view"})
MAYBE_COPY_OPS = frozenset({"to", "reshape", "contiguous", "type_as"})


def is_view_op(name: str) -> bool:
    """aten op ``name`` (without the namespace) returns a view of its input, in some overload."""
    packet = getattr(torch.ops.aten, name, None)
    return packet is not None and any(getattr(packet, o).is_view for o in packet.overloads())


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while it is active (``with OpCounter() as c: ...``),
    on the calling thread and on autograd's backward threads; ``c.total``, ``c.counts``, and
    ``c.views``: those that only make a view (view, slice, permute, detach, ...: dispatcher work
    but no kernel on a GPU)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.views = 0
        self.mask_indexing = 0
        self.repeat_sized = 0
        self.host_reads: collections.Counter = collections.Counter()

    # Tensor.tolist() / .numpy() read a tensor without dispatching an op on the CPU (on a GPU
    # they copy it to the host first, a sync): counted by wrapping them while the mode is active
    _READS = ("tolist", "numpy")

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self._READS}
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, self._counting(name, fn))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        return super().__exit__(*exc)

    def _counting(self, name, fn):
        def read(tensor, *args, **kwargs):
            self.host_reads[name] += 1
            return fn(tensor, *args, **kwargs)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        self.views += bool(getattr(func, "is_view", False))
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
            self.mask_indexing += 1  # a boolean mask: nonzero inside, not dispatched on its own on the CPU
        if func is torch.ops.aten.repeat_interleave.Tensor and (kwargs or {}).get("output_size") is None:
            self.repeat_sized += 1  # tensor repeats without output_size: the result's size is read back
        return func(*args, **(kwargs or {}))

    @property
    def host_syncs(self) -> dict:
        """The ops that make a GPU wait for the host to read a value or a size (``.item()`` /
        ``bool()`` / ``float()`` of a tensor, ``.tolist()``, ``.numpy()``, ``nonzero`` and what
        calls it: boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave``
        without its output size): on the CPU, the count of what
        ``torch.cuda.set_sync_debug_mode`` would stop on a GPU."""
        out = {k: v for k, v in self.counts.items() if k in SYNC_OPS}
        if self.mask_indexing:
            out["index (boolean mask)"] = self.mask_indexing
        if self.repeat_sized:
            out["repeat_interleave (no output_size)"] = self.repeat_sized
        out.update(self.host_reads)
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def parse_switches(items: list[str]) -> dict[str, bool]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if value.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"error: --fast {item!r}: expected KEY=true or KEY=false")
        out[key] = value.lower() in ("true", "1")
    return out


def random_gt(g: torch.Generator, B: int, G: int, h: int, w: int, num_classes: int) -> Targets:
    """Boxes with log-uniform sides from 4 px to ~0.9 of the image, inside the image."""
    lo = torch.log(torch.tensor(4.0))
    bw = torch.exp(lo + torch.rand(B, G, generator=g) * (torch.log(torch.tensor(0.9 * w)) - lo))
    bh = torch.exp(lo + torch.rand(B, G, generator=g) * (torch.log(torch.tensor(0.9 * h)) - lo))
    x1 = torch.rand(B, G, generator=g) * (w - bw)
    y1 = torch.rand(B, G, generator=g) * (h - bh)
    boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], -1)
    labels = torch.randint(0, num_classes, (B, G), generator=g)
    return Targets(boxes, labels, torch.ones(B, G, dtype=torch.bool))


def realistic_head_init_(model, g: torch.Generator) -> None:
    head = model.bbox_head
    with torch.no_grad():
        fan_in = head.gfl_cls.weight[0].numel()
        head.gfl_cls.weight.copy_(torch.randn(head.gfl_cls.weight.shape, generator=g) * 0.72 / fan_in ** 0.5)
        head.gfl_cls.bias.copy_(torch.randn(head.gfl_cls.bias.shape, generator=g) * 0.5 - 5.25)
        head.gfl_reg.weight.copy_(torch.randn(head.gfl_reg.weight.shape, generator=g) * 1.2 / fan_in ** 0.5)


def amp_dtype(arg: str | None, device: torch.device):
    if arg is None:
        return None
    if arg == "fp16":
        return torch.float16
    if arg == "bf16" or device.type == "cpu" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(args) -> dict:
    from mmengine.config import Config

    from gfl_det.fast.malloc import describe, retain_freed_memory
    if not args.system_malloc:
        retain_freed_memory()  # as tools/train.py and tools/test.py do
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.count_kernels and device.type == "cpu":
        import torch._inductor.config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True  # name inductor's CPU kernels in the profile
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        from mmengine.config import DictAction
        opts = argparse.Namespace()
        DictAction(option_strings=[], dest="o")(None, opts, args.cfg_options)
        cfg.merge_from_dict(opts.o)
    model_cfg = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    model_cfg.get("backbone", {}).pop("init_cfg", None)  # random weights: no pretrained download
    if args.fast:
        model_cfg["fast"] = dict(model_cfg.get("fast") or {}, **parse_switches(args.fast))
    model = build_detector(model_cfg)
    g = torch.Generator().manual_seed(args.seed)
    if args.checkpoint:
        from gfl_det.checkpoint import load_weights
        load_weights(model, args.checkpoint)
    elif args.task != "train":
        realistic_head_init_(model, g)
    model.to(device)
    if args.channels_last:
        model.channels_last = True  # NHWC weights; preprocess gives NHWC batches
    if args.compile_mode and not (args.compile and args.task == "infer"):
        raise SystemExit("error: --compile-mode is for --task infer --compile")
    if args.task == "infer":
        from gfl_det.apis import optimize_for_inference
        # what tools/test.py --compile / --winograd / --fuse-conv-bn and init_detector do
        optimize_for_inference(model, fuse_conv_bn=not args.no_fuse, compile=args.compile, winograd=args.winograd,
                               cuda_graph=args.cuda_graph, compile_mode=args.compile_mode)
    elif args.winograd or args.cuda_graph:
        raise SystemExit("error: --winograd and --cuda-graph are inference options (--task infer)")
    elif args.compile:
        model.backbone = torch.compile(model.backbone)
        model.neck = torch.compile(model.neck)
        model.bbox_head = torch.compile(model.bbox_head)
    if args.compile_loss:
        if args.task == "infer":
            raise SystemExit("error: --compile-loss is for --task train or loss")
        model.criterion.compile_loss = True  # model.fast.compile_loss (gfl_det/fast/compile_loss.py)
    dtype = amp_dtype(args.amp, device)

    B, (H, W) = args.batch, args.shape
    Hb, Wb = -(-H // 32) * 32, -(-W // 32) * 32
    metas = [dict(img_shape=(H, W), pad_shape=(Hb, Wb), batch_input_shape=(Hb, Wb), ori_shape=(H, W),
                  scale_factor=(1.0, 1.0)) for _ in range(B)]
    images = torch.randint(0, 256, (B, 3, Hb, Wb), dtype=torch.uint8, generator=g)
    targets = random_gt(g, B, args.num_gt, H, W, model.num_classes).to(device)
    if device.type == "cuda":
        images = images.pin_memory()
        torch.cuda.reset_peak_memory_stats(device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    if args.task == "train":
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # what tools/train.py runs: the configs' fused SGD (one kernel for all parameters) in
        # gfl_det's optim wrapper, whose non-finite guard skips a bad step on the device
        from gfl_det.mm.optim import AmpOptimWrapper, OptimWrapper
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, fused=True)
        ow = (AmpOptimWrapper(optimizer=opt, dtype=str(dtype).replace("torch.", "")) if dtype is not None
              else OptimWrapper(optimizer=opt))

        def step():
            with ow.optim_context(model):  # autocast under --amp
                losses = model.loss(model.preprocess(images, metas), targets, metas)
            ow.update_params(sum(losses.values()))
    elif args.task == "infer":
        model.eval()

        @torch.no_grad()
        def step():
            x = model.preprocess(images, metas)
            with autocast():
                preds = model.predict(x, metas)
            return preds
    else:
        model.train()
        with torch.no_grad(), autocast():
            out = model(model.preprocess(images, metas))
        out = HeadOutputs([c.detach().requires_grad_() for c in out.cls],
                          [r.detach().requires_grad_() for r in out.reg])

        def step():
            losses = model.criterion(out, targets, metas)
            sum(losses.values()).backward()

    @torch.no_grad()
    def forward():  # the inference forward without post-processing (--sync-check of --task infer)
        with autocast():
            return model(model.preprocess(images, metas))

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    res = dict(task=args.task, config=args.config, device=str(device), batch=B, shape=[H, W], num_gt=args.num_gt,
               amp=str(dtype).replace("torch.", "") if dtype else None, channels_last=args.channels_last,
               compile=args.compile, compile_mode=args.compile_mode, compile_loss=args.compile_loss,
               fast=parse_switches(args.fast),
               cfg_options=args.cfg_options,
               fused_bn=args.task == "infer" and (args.compile or args.winograd or args.cuda_graph or not args.no_fuse),
               winograd=args.winograd, cuda_graph=args.cuda_graph, malloc=describe(), threads=torch.get_num_threads(),
               torch=torch.__version__,
               iters=args.iters, warmup_s=round(warmup_s, 3), median_s=med, min_s=min(times), max_s=max(times),
               images_per_s=B / med, peak_mem_mb=round(peak_mem_mb(device), 1))
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    if args.count_ops:
        with OpCounter() as counter:
            step()
        sync(device)
        res["ops_per_iter"] = counter.total
        res["view_ops_per_iter"] = counter.views
        res["ops_top"] = dict(counter.counts.most_common(12))
        res["host_syncs"] = counter.host_syncs
    if args.count_kernels:
        res.update(count_kernels(step, device))
    if args.sync_check:
        res.update(sync_check(step if args.task != "infer" else forward, device, args.task))
    if args.task == "infer":
        got = step()
        res["num_dets"] = [len(p["bboxes"]) for p in got]
        if args.cuda_graph:  # the replayed graph against the eager model on the same batch
            graphed = model.__dict__.pop("graphed_predict")
            want = step()
            model.__dict__["graphed_predict"] = graphed
            res["graph_vs_eager"] = compare_detections(got, want)
            res["graph_captures"] = graphed.captures
    if args.task == "train":
        ow.settle()  # the guard's verdicts (stops on max_consecutive non-finite steps in a row)
        res["nonfinite_skipped"] = ow.guard.skipped
    return res


def compare_detections(got: list[dict], want: list[dict]) -> dict:
    """Per batch: whether the numbers of detections and their labels agree, and the largest box
    and score differences where they do."""
    same = all(len(g["bboxes"]) == len(w["bboxes"]) and torch.equal(g["labels"], w["labels"])
               for g, w in zip(got, want))
    out = dict(same_labels=same)
    if same and any(len(w["bboxes"]) for w in want):
        out["max_box_diff"] = max(float((g["bboxes"] - w["bboxes"]).abs().max()) for g, w in zip(got, want)
                                  if len(w["bboxes"]))
        out["max_score_diff"] = max(float((g["scores"] - w["scores"]).abs().max()) for g, w in zip(got, want)
                                    if len(w["bboxes"]))
    return out


def count_kernels(fn, device: torch.device) -> dict:
    """Runs ``fn`` once under torch.profiler and counts the launches: on CUDA every device-side
    event (kernels, memcpy, memset); on the CPU every aten op or inductor kernel (``cpp_fused_*``,
    named when ``torch._inductor.config.cpp.enable_kernel_profile`` is set before compiling, as
    ``run`` does) with no such op around it, less views and allocations -- what a GPU would
    launch one kernel (or a few: one op may run several) for.
    Returns ``kernels_per_iter`` and the 12 most frequent names (``kernels_top``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    events = prof.events()
    if cuda:
        launched = [e.name for e in events if e.device_type == DeviceType.CUDA]
    else:
        def op(e):
            return e.name.startswith("aten::") or "cpp_fused" in e.name

        def outermost(e):
            p = e.cpu_parent
            while p is not None:
                if op(p):
                    return False
                p = p.cpu_parent
            return True

        def copies(e):
            return e.name == "aten::copy_" or any(copies(c) for c in e.cpu_children)

        def launches(e):  # views and allocations launch nothing; .to / reshape only when they copy
            name = e.name.removeprefix("aten::")
            if name in MAYBE_COPY_OPS:
                return copies(e)
            return not (name in ALLOCATION_OPS or is_view_op(name))
        launched = [e.name for e in events if op(e) and outermost(e) and launches(e)]
    return dict(kernels_per_iter=len(launched),
                kernels_top=dict(collections.Counter(launched).most_common(12)))


def sync_check(fn, device: torch.device, task: str) -> dict:
    """Runs ``fn`` once under ``torch.cuda.set_sync_debug_mode('error')``: a host synchronisation
    inside (``.item()``, ``nonzero``, a copy from pageable memory, ...) raises. Returns
    ``sync_free`` and, on a sync, the error and the innermost frame of this project's code."""
    import traceback
    if device.type != "cuda":
        raise SystemExit("error: --sync-check needs a CUDA device (torch.cuda.set_sync_debug_mode)")
    what = {"train": "training step", "loss": "loss call", "infer": "inference forward"}[task]
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        out = dict(sync_checked=what, sync_free=True)
    except RuntimeError as e:
        ours = [f for f in traceback.extract_tb(e.__traceback__) if "/gfl_det/" in f.filename or "/tools/" in f.filename]
        where = f"{ours[-1].filename}:{ours[-1].lineno} {ours[-1].line}" if ours else None
        out = dict(sync_checked=what, sync_free=False, sync_error=str(e)[:300], sync_at=where)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        res = run(args)
    except ValueError as e:  # a refused option combination (the message says which and why)
        raise SystemExit(f"error: {e}")
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['task']} on {res['device']} ({res['threads']} threads), batch {res['batch']} x "
              f"{res['shape'][0]}x{res['shape'][1]}, {res['num_gt']} gt, amp={res['amp']}, "
              f"channels_last={res['channels_last']}, compile={res['compile']}, winograd={res['winograd']}")
        print(f"  {res['malloc']}")
        print(f"  median {res['median_s']:.4f} s/iter  (min {res['min_s']:.4f}, max {res['max_s']:.4f}, "
              f"{res['iters']} iters after {args.warmup} warm-up)")
        print(f"  {res['images_per_s']:.2f} images/s, peak memory {res['peak_mem_mb']:.0f} MB")
        if "sync_free" in res:
            print(f"  {res['sync_checked']}: " + ("no host synchronisation" if res["sync_free"] else
                                                   f"host synchronisation at {res['sync_at']}: {res['sync_error']}"))
        if "ops_per_iter" in res:
            what = {"train": "training step (forward, loss, backward, SGD step)", "loss": "loss call (forward + backward)",
                    "infer": "inference call (forward + post-processing)"}[res["task"]]
            top = ", ".join(f"{k} {v}" for k, v in res["ops_top"].items())
            print(f"  {res['ops_per_iter']} aten ops per {what} ({res['view_ops_per_iter']} of them views); "
                  f"most frequent: {top}")
            syncs = ", ".join(f"{k} {v}" for k, v in res["host_syncs"].items()) or "none"
            print(f"  ops that wait for the host on a GPU: {syncs}")
        if "kernels_per_iter" in res:
            what = "kernels, memcpys and memsets on the GPU" if res["device"].startswith("cuda") else \
                "outermost aten ops and inductor kernels"
            top = ", ".join(f"{k} {v}" for k, v in res["kernels_top"].items())
            print(f"  {res['kernels_per_iter']} {what} per iteration; most frequent: {top}")


if __name__ == "__main__":
    main()
