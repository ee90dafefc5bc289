#!/usr/bin/env bash
# Issue 17's GPU checks in one run, for a session that is lent the GPU machine (one H200; no
# network, no mmengine/mmdet/pycocotools there: ../shared/device/README.md). Every step writes JSON
# lines under $OUT as it goes (a cut run keeps what it measured) and has its own timeout:
#
#   count     tools/benchmark.py --count-ops --count-kernels on CUDA: aten ops and the kernels the
#             GPU ran (torch.profiler) per training step, loss call and inference call (R50,
#             2 x 512x768); the loss and the step also with --compile-loss         -> count_ops.jsonl
#   sync      tools/benchmark.py --sync-check: torch.cuda.set_sync_debug_mode('error') over a training
#             step (fp32, bf16), a loss call and an inference forward              -> sync.jsonl
#   graph     tools/benchmark.py --task infer --cuda-graph beside eager, 1333x800, batch 1 fp32 and
#             batch 8 fp32 / fp16 (images/s, kernels, detections graph vs eager); --compile with
#             torch's default mode and with reduce-overhead (inductor's CUDA graphs); and, when
#             pytest came along in .whl, tests/test_cuda_graph.py (its real CUDA capture test)
#                                                                                  -> graph.jsonl
#   pipeline  tools/train.py configs/gfl_r50.py --amp bfloat16 on coco128, batch 16, 14 workers,
#             5 epochs (40 iterations): the real pipeline's images/s (loader, hooks, the guard on the
#             device, logging), the issue's >= 200 images/s target               -> pipeline.jsonl
#   bench     tools/bench_vs_mmdet.py --device cuda: our rows beside MMDetection's
#             bench_mmdet_gpu.py (train 2 fp32/fp16/bf16, 16 fp16; infer 1 fp32/fp16, 8 fp16)
#                                                                                  -> bench.jsonl
#   switches  what only a GPU can decide: model.fast.fold_bn (the backbone's fixed-statistics BNs
#             folded into their convs: less memory and BN kernel time, more launches) off / on at
#             batch 16 bf16 and batch 2 fp32; --compile-loss (the criterion through inductor) on
#             a loss call with 100 gt and a batch-2 training step; backbone with_cp at batch 16
#             (memory for compute)                                               -> switches.jsonl
# About 22 minutes in all (typical; each run has its own timeout): more than one session's
# 15 minutes of device time with the machine's start-up, so split it, e.g. a first session
# STEPS="sync graph pipeline" (~11 min: the issue's sync, inference and pipeline targets), a
# next one STEPS="count bench switches" (steps run in the order given).
#
# Here, once, from the project root (both git-ignored):
#   bash ../shared/device/prepare_wheels.sh pytest pluggy iniconfig   # .whl/: the py3.12 wheels that machine lacks
#   bash ../shared/device/stage_ref.sh           # .ref/: mmdet_ref, bench_mmdet_gpu.py, coco128
# There (the run tool, carry [".whl", ".ref"], timeout 600):
#   bash tools/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu_check_out}
STEPS=${STEPS:-count sync graph pipeline bench switches}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 || { echo "pip install of .whl failed: $OUT/pip.log"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD
PY=python3
R50=configs/gfl_r50.py

note() {  # step name, exit status -> steps.jsonl
  echo "{\"step\": \"$1\", \"rc\": $2, \"time\": \"$(date +%H:%M:%S)\"}" >> "$OUT/steps.jsonl"
  echo "== $1: exit $2"
}
bench() {  # output file, timeout, benchmark arguments...
  local out=$1 limit=$2; shift 2
  timeout "$limit" $PY tools/benchmark.py $R50 --device cuda --json "$@" >> "$OUT/$out" 2>> "$OUT/${out%.jsonl}.err"
}

{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  > "$OUT/env.txt" 2>&1

for s in $STEPS; do
  case $s in
    count)
      for t in "loss --num-gt 100" "train --num-gt 10" "infer --num-gt 10" "infer --num-gt 10 --no-fuse"; do
        bench count_ops.jsonl 120 --task $t --batch 2 --shape 512 768 --iters 3 --warmup 2 --count-ops --count-kernels
        note "count $t" $?
      done
      for t in "loss --num-gt 100" "train --num-gt 10"; do
        bench count_ops.jsonl 150 --task $t --batch 2 --shape 512 768 --iters 3 --warmup 3 --count-kernels --compile-loss
        note "count $t compile-loss" $?
      done ;;
    sync)
      for t in "train" "train --amp bf16" "loss" "infer"; do
        bench sync.jsonl 120 --task $t --batch 2 --shape 800 1333 --num-gt 10 --iters 3 --warmup 2 --sync-check
        note "sync $t" $?
      done ;;
    graph)
      for t in "--batch 1" "--batch 8" "--batch 8 --amp fp16"; do
        for g in "--cuda-graph" ""; do
          bench graph.jsonl 120 --task infer $t --shape 800 1333 --num-gt 10 --iters 20 --warmup 3 --count-kernels $g
          note "graph infer $t $g" $?
        done
      done
      for m in "" "--compile-mode reduce-overhead"; do  # the compiled rows: compile time in warmup_s
        bench graph.jsonl 240 --task infer --batch 1 --shape 800 1333 --num-gt 10 --iters 20 --warmup 3 --compile $m
        note "graph infer --batch 1 --compile $m" $?
      done
      if $PY -c "import pytest" 2>/dev/null; then
        timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py \
          > "$OUT/pytest_gpu.log" 2>&1
        note "graph pytest" $?
      fi ;;
    pipeline)
      wd=/tmp/gfl_pipeline; rm -rf $wd
      ref=$PWD/.ref/coco128
      data="data_root=$ref/ ann_file=annotations/instances_coco128.json data_prefix.img=images/"
      opts=""
      for k in $data; do opts="$opts train_dataloader.dataset.$k val_dataloader.dataset.$k"; done
      timeout 300 $PY tools/train.py $R50 --amp bfloat16 --work-dir $wd --cfg-options model.backbone.init_cfg=None \
        $opts val_evaluator.ann_file=$ref/annotations/instances_coco128.json train_cfg.max_epochs=5 \
        train_dataloader.batch_size=16 train_dataloader.num_workers=14 default_hooks.logger.interval=5 \
        train_cfg.val_interval=100 default_hooks.checkpoint.interval=100 > "$OUT/pipeline.log" 2>&1
      rc=$?
      $PY - "$wd" >> "$OUT/pipeline.jsonl" <<'EOF'
import glob, json, statistics, sys
recs = [json.loads(l) for f in sorted(glob.glob(sys.argv[1] + '/*/vis_data/scalars.json'))[-1:] for l in open(f)]
train = [r for r in recs if 'loss' in r and 'time' in r]
late = [r for r in train if r['iter'] > 15] or train
t = statistics.mean(r['time'] for r in late) if late else None
print(json.dumps(dict(what='tools/train.py configs/gfl_r50.py --amp bfloat16, coco128, batch 16, 14 workers', iters=[r['iter'] for r in train],
                      s_per_iter=t, data_s=statistics.mean(r['data_time'] for r in late) if late else None,
                      images_per_s=16 / t if t else None, grad_norm=[r.get('grad_norm') for r in train])))
EOF
      note pipeline $rc ;;
    bench)
      timeout 420 $PY tools/bench_vs_mmdet.py --device cuda --config $R50 > "$OUT/bench.jsonl" 2> "$OUT/bench.err"
      note bench $? ;;
    switches)
      for t in "--batch 16 --amp bf16" "--batch 2"; do
        for f in false true; do
          bench switches.jsonl 90 --task train $t --shape 800 1333 --num-gt 10 --iters 10 --warmup 3 --fast fold_bn=$f
          note "switches $t fold_bn=$f" $?
        done
      done
      bench switches.jsonl 90 --task train --batch 16 --amp bf16 --shape 800 1333 --num-gt 10 --iters 10 --warmup 3 \
        --cfg-options model.backbone.with_cp=True
      note "switches batch 16 bf16 with_cp" $?
      bench switches.jsonl 90 --task train --batch 16 --amp bf16 --shape 800 1333 --num-gt 10 --iters 10 --warmup 3 \
        --cfg-options model.backbone.with_cp=True --fast fold_bn=true
      note "switches batch 16 bf16 with_cp fold_bn" $?
      # backbone + FPN + head through torch.compile in training (frozen BNs and the elementwise work
      # between convs fused): on the CPU inductor's conv-backward lowering specialises on the level
      # sizes (a compilation per shape family), so no train.py switch until a GPU shows it pays
      bench switches.jsonl 300 --task train --batch 16 --amp bf16 --shape 800 1333 --num-gt 10 --iters 10 --warmup 3 \
        --compile --count-kernels
      note "switches batch 16 bf16 compile" $?
      for t in "loss --num-gt 100" "train --num-gt 10"; do
        bench switches.jsonl 150 --task $t --batch 2 --shape 800 1333 --iters 10 --warmup 3 --compile-loss --count-kernels
        note "switches $t compile-loss" $?
      done ;;
    *) echo "unknown step $s (count sync graph pipeline bench switches)"; exit 2 ;;
  esac
done
