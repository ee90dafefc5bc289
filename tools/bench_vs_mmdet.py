#!/usr/bin/env python
"""gfl_det beside MMDetection on this machine, in one run, reported as ratios.

    bash ../shared/mmdet_ref/setup.sh            # once: MMDetection 3.3.0 in /tmp/anchor/venv
    python tools/bench_vs_mmdet.py [--config configs/gfl_r50.py] [--markdown]
    python3 tools/bench_vs_mmdet.py --device cuda [--markdown]      # GPU machine (tools/gpu_check.sh)

Runs ../shared/mmdet_ref/bench_cpu.py (R50 GFL: train step 2 x 800 x 1216 with 10 gt, head
loss with 10 / 100 gt, predict 1 x 800 x 1216) and the same workloads through
tools/benchmark.py, then prints gfl_det / mmdet ratios (lower is faster). Extra rows: our
options (``--channels-last``, ``--winograd``, ``--compile``), the gfl_det/fast/ switches against
our defaults (the fused QFL pass on, the separable stem pool off, glibc's malloc defaults instead
of the kept freed memory: gfl_det/fast/malloc.py), and our train step / inference under bf16
autocast (marked: those compare our mixed precision with their fp32). The machine may be shared: only ratios from the
same run on an otherwise idle machine mean anything.

``--device cuda`` runs ../shared/device/bench_mmdet_gpu.py (or its copy staged in .ref/device/)
and the same GPU workloads through ``tools/benchmark.py --device cuda``, printing one JSON line
per row as it goes (a cut run keeps what it measured).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GFL_DET_SHARED") or ROOT.parent / "shared")
DEFAULT_MMDET_PYTHON = os.environ.get("MMDET_PYTHON", "/tmp/anchor/venv/bin/python")


def ours(config: str, *args: str, threads: int | None = None, device: str = "cpu") -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), config, "--json", "--device", device, *args]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# MMDetection's GPU rows (../shared/device/bench_mmdet_gpu.py: 800x1333 padded to 800x1344, 10 gt,
# 15 timed iterations after 5) and the same workloads through tools/benchmark.py
CUDA_ROWS = [("train", 2, None), ("train", 2, "fp16"), ("train", 2, "bf16"), ("train", 16, "fp16"),
             ("infer", 1, None), ("infer", 1, "fp16"), ("infer", 8, "fp16")]


def cuda_reference() -> tuple[Path, Path]:
    """(bench_mmdet_gpu.py, mmdet_ref): from .ref/ (staged for the GPU machine by
    ../shared/device/stage_ref.sh) or ../shared."""
    for base in (ROOT / ".ref", SHARED):
        script, ref = base / "device" / "bench_mmdet_gpu.py", base / "mmdet_ref"
        if script.is_file() and ref.is_dir():
            return script, ref
    sys.exit(f"error: need bench_mmdet_gpu.py and mmdet_ref in {ROOT / '.ref'} or {SHARED} "
             "(bash ../shared/device/stage_ref.sh copies them into .ref/)")


def cuda_main(args) -> None:
    """The GPU table: MMDetection 3.3.0 (bench_mmdet_gpu.py, run by --mmdet-python, by default this
    interpreter: on the GPU machine mmdet comes from the staged wheels on PYTHONPATH) beside
    tools/benchmark.py --device cuda, one JSON line per row as it is measured."""
    import torch
    if not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    script, ref = cuda_reference()
    py = args.mmdet_python if args.mmdet_python != DEFAULT_MMDET_PYTHON else sys.executable
    res = subprocess.run([py, str(script), str(ref)], capture_output=True, text=True)
    mm = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            mm[(r["task"], r["batch"], r["amp"])] = r
    if not mm:
        sys.exit(f"error: {script} printed no rows (exit {res.returncode}): {res.stderr[-2000:]}")
    rows = []
    for task, batch, amp in CUDA_ROWS:
        cmd = ["--task", task, "--batch", str(batch), "--shape", "800", "1333", "--num-gt", "10",
               "--iters", "15", "--warmup", "5"] + (["--amp", amp] if amp else [])
        try:
            t = ours(args.config, *cmd, device="cuda")
        except subprocess.CalledProcessError as e:
            t = dict(error=(e.stderr or "")[-300:])
        m = mm.get((task, batch, amp), {})
        row = dict(task=task, batch=batch, amp=amp, gfl_det_s=t.get("median_s"), mmdet_s=m.get("median_s"),
                   gfl_det_images_per_s=t.get("images_per_s"), mmdet_images_per_s=m.get("images_per_s"),
                   gfl_det_peak_mem_mb=t.get("peak_mem_mb"), mmdet_peak_mem_mb=m.get("peak_mem_mb"),
                   gpu=t.get("gpu"), error=t.get("error") or m.get("error"))
        if row["gfl_det_s"] and row["mmdet_s"]:
            row["ratio"] = row["gfl_det_s"] / row["mmdet_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.markdown:
        print(f"| {rows[0].get('gpu') or 'GPU'} | gfl_det s | MMDetection s | ratio |\n|---|---:|---:|---:|")
        for r in rows:
            name = f"{r['task']}, batch {r['batch']}, {r['amp'] or 'fp32'}"
            a, b = r["gfl_det_s"], r["mmdet_s"]
            print(f"| {name} | {a if a is None else f'{a:.4f}'} | {b if b is None else f'{b:.4f}'} | "
                  f"{r.get('ratio', float('nan')):.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "gfl_r50.py"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: the CPU table (../shared/mmdet_ref/bench_cpu.py in the MMDetection venv); cuda: the "
                        "GPU table (bench_mmdet_gpu.py: train batch 2 fp32/fp16/bf16 and 16 fp16, inference batch 1 "
                        "fp32/fp16 and 8 fp16, 800x1333), one JSON line per row")
    p.add_argument("--mmdet-python", default=DEFAULT_MMDET_PYTHON,
                   help="the interpreter with MMDetection (cpu default: /tmp/anchor/venv/bin/python or "
                        "$MMDET_PYTHON; cuda default: this one, with the staged wheels on PYTHONPATH)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile inference row")
    p.add_argument("--skip-amp", action="store_true", help="leave out the bf16 rows (ours in bf16, theirs fp32)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda":
        return cuda_main(args)
    bench = SHARED / "mmdet_ref" / "bench_cpu.py"
    if not bench.is_file() or not Path(args.mmdet_python).is_file():
        sys.exit(f"error: need {bench} and an MMDetection venv at {args.mmdet_python}; "
                 f"run `bash {SHARED / 'mmdet_ref' / 'setup.sh'}` first")
    cmd = [args.mmdet_python, str(bench), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    if args.skip_train:
        cmd.append("--skip-train")
    mm = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    r = str(args.repeats)
    rows = []
    train = ("--task", "train", "--batch", "2", "--shape", "800", "1216", "--num-gt", "10", "--iters", r, "--warmup", "1")
    infer = ("--task", "infer", "--batch", "1", "--shape", "800", "1216", "--iters", r)
    if not args.skip_train:
        t = ours(args.config, *train, threads=args.threads)
        rows.append(("train step, 2 x 800x1216, 10 gt", t["median_s"], mm["train_step_s"]))
        t = ours(args.config, *train, "--channels-last", threads=args.threads)
        rows.append(("train step, `--channels-last`", t["median_s"], mm["train_step_s"]))
        t = ours(args.config, *train, "--system-malloc", threads=args.threads)
        rows.append(("train step, `--system-malloc` (glibc defaults)", t["median_s"], mm["train_step_s"]))
        if not args.skip_amp:
            t = ours(args.config, *train, "--amp", "bf16", threads=args.threads)
            rows.append(("train step, `--amp` bf16 (theirs fp32)", t["median_s"], mm["train_step_s"]))
    for g in (10, 100):
        t = ours(args.config, "--task", "loss", "--batch", "2", "--shape", "800", "1216", "--num-gt", str(g),
                 "--iters", "7", "--warmup", "2", threads=args.threads)
        rows.append((f"head loss fwd+bwd, 2 images, {g} gt", t["median_s"], mm[f"head_loss_fwdbwd_s_gt{g}"]))
        t = ours(args.config, "--task", "loss", "--batch", "2", "--shape", "800", "1216", "--num-gt", str(g),
                 "--iters", "7", "--warmup", "2", "--fast", "fused_qfl=true", threads=args.threads)
        rows.append((f"head loss, {g} gt, `fast.fused_qfl`", t["median_s"], mm[f"head_loss_fwdbwd_s_gt{g}"]))
    t = ours(args.config, *infer, "--warmup", "1", threads=args.threads)
    rows.append(("inference incl. NMS, 1 x 800x1216 (BN folded)", t["median_s"], mm["predict_s"]))
    t = ours(args.config, *infer, "--channels-last", "--warmup", "1", threads=args.threads)
    rows.append(("inference, `--channels-last`", t["median_s"], mm["predict_s"]))
    t = ours(args.config, *infer, "--winograd", "--warmup", "1", threads=args.threads)
    rows.append(("inference, `--winograd`", t["median_s"], mm["predict_s"]))
    t = ours(args.config, *infer, "--fast", "stem_pool=false", "--warmup", "1", threads=args.threads)
    rows.append(("inference, without `fast.stem_pool`", t["median_s"], mm["predict_s"]))
    t = ours(args.config, *infer, "--system-malloc", "--warmup", "1", threads=args.threads)
    rows.append(("inference, `--system-malloc` (glibc defaults)", t["median_s"], mm["predict_s"]))
    if not args.skip_compile:
        t = ours(args.config, *infer, "--compile", "--warmup", "2", threads=args.threads)
        rows.append(("inference, `--compile` (after ~%.0f s compiling once)" % t["warmup_s"], t["median_s"],
                     mm["predict_s"]))
    if not args.skip_amp:
        t = ours(args.config, *infer, "--amp", "bf16", "--warmup", "1", threads=args.threads)
        rows.append(("inference, bf16 autocast (theirs fp32)", t["median_s"], mm["predict_s"]))
    if args.markdown:
        print(f"| CPU, {args.threads} threads | gfl_det s | MMDetection s | ratio |\n|---|---:|---:|---:|")
        for name, a, b in rows:
            print(f"| {name} | {a:.4f} | {b:.4f} | {a / b:.2f} |")
    else:
        for name, a, b in rows:
            print(f"{name:<40} gfl_det {a:9.4f} s   mmdet {b:9.4f} s   ratio {a / b:.2f}")
    print(json.dumps(dict(mmdet=mm, rows=[dict(task=n, gfl_det_s=a, mmdet_s=b, ratio=a / b) for n, a, b in rows])))


if __name__ == "__main__":
    main()
