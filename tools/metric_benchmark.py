#!/usr/bin/env python
"""Metric-learning benchmark a reader can reproduce on a CPU, and the speed comparison.

Quality (default): scikit-learn's bundled digits (1,797 8x8 images, 10 classes, no download),
open-set as metric learning is evaluated: train on 5 classes, evaluate on the 5 unseen ones,
both splits (0-4 -> 5-9 and 5-9 -> 0-4), several seeds; mean +- std over splits x seeds.
Every loss trains the same small CNN from the same initial weights (per seed) on the same
P x K batches (P = 5 identities x K = 16 samples) for the same number of steps; rows for raw
pixels and the untrained network are the floor. Where pytorch-metric-learning (PML) has the
loss, the same network is also trained with PML's loss / miner in the same run.

    python tools/metric_benchmark.py                     # 5 seeds x 2 splits (~10 min, 1 thread)
    python tools/metric_benchmark.py --quick             # CI size: 1 seed, fewer steps
    python tools/metric_benchmark.py --speed             # loss + mining time and memory vs PML

Speed (--speed): forward + backward of each loss with its mining on random embeddings
(N = 512 and 4,096, D = 128, 64 identities), ours and PML's interleaved in one process, medians
and the ratio ours / PML; peak memory of one forward + backward measured in a fresh process
each (the peak resident set above the inputs; PML's triplet miner capped at --memory-cap GiB).
Everything runs on --threads threads (default 1: on a machine shared by other jobs a second
OpenMP thread that waits for a busy core makes small ops 10-100x slower).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gfl_det.metric import (ArcFaceLoss, SiameseBinaryHead, clustering_metrics, contrastive_loss,  # noqa: E402
                            npair_loss, retrieval_metrics, siamese_binary_loss, triplet_loss,
                            verification_metrics, verification_pairs)

try:
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    PML_MISSING = None
except ImportError as e:  # the benchmark runs without PML and says which rows it skips
    PML_MISSING = f"pytorch-metric-learning is not installed ({e}); pip install pytorch-metric-learning==2.9.0"

SPLITS = {"0-4 -> 5-9": ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)), "5-9 -> 0-4": ((5, 6, 7, 8, 9), (0, 1, 2, 3, 4))}
COLUMNS = [("MAP@R", "map_at_r"), ("R@1", "precision_at_1"), ("NMI", "nmi"), ("F1", "f1"),
           ("Verif. acc", "accuracy")]
MARGIN, ARC_SCALE, ARC_MARGIN, NPAIR_SCALE = 0.2, 16.0, 0.5, 16.0
P, K = 5, 16  # identities x samples per batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds per split (quality)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--steps", type=int, default=300, help="training steps per loss")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (network, centres, head)")
    p.add_argument("--quick", action="store_true", help="CI size: 1 seed, 60 steps")
    p.add_argument("--only", nargs="*", help="only the rows (quality) / losses (--speed) whose name contains one of these")
    p.add_argument("--speed", action="store_true", help="time and memory of the losses vs PML instead")
    p.add_argument("--sizes", type=int, nargs="*", default=[512, 4096], help="--speed batch sizes N")
    p.add_argument("--repeats", type=int, default=5, help="--speed timed repetitions (after a warm-up)")
    p.add_argument("--memory-cap", type=float, default=8.0, help="--speed: GiB a memory probe may add")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    p.add_argument("--memory-probe", nargs=3, metavar=("CASE", "N", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 60
    return args


# ---------------------------------------------------------------- quality benchmark

def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


class SmallCNN(nn.Module):
    """8x8 digit -> D-dimensional embedding: three 3x3 convolutions, a 2x2 pool, the 4x4 map
    flattened (where a stroke is matters for digits) into a linear layer (~110k parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
        self.net = nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64),
                                 nn.Flatten(), nn.Linear(64 * 4 * 4, dim))

    def forward(self, x):
        return self.net(x.view(-1, 1, 8, 8))


def pk_batches(labels: torch.Tensor, steps: int, p: int, k: int, g: torch.Generator):
    """P x K sampling: each batch holds p identities x k samples, identity by identity (k in a
    row): the first two of each identity are its anchor-positive pair for the N-pair loss."""
    classes = labels.unique()
    members = [(labels == c).nonzero().squeeze(1) for c in classes]
    for _ in range(steps):
        chosen = torch.randperm(len(classes), generator=g)[:p]
        yield torch.cat([members[c][torch.randperm(len(members[c]), generator=g)[:k]] for c in chosen])


def methods(dim: int, num_classes: int) -> dict:
    """name -> (builder, needs PML). builder() -> (loss(emb, labels), extra nn.Module or None)."""
    def ours_triplet(mining, synthesis=None):
        return lambda: (lambda e, y: triplet_loss(e, y, MARGIN, mining, synthesis), None)

    def npair(e, y, synthesis=None):  # Sohn's batches: one pair per identity (as PML's NPairsLoss takes)
        blocks, labels = e.view(P, K, -1), y.view(P, K)[:, 0]
        return npair_loss(blocks[:, 0], blocks[:, 1], labels, NPAIR_SCALE, synthesis)

    def arcface():
        arc = ArcFaceLoss(num_classes, dim, ARC_SCALE, ARC_MARGIN)
        return (lambda e, y: arc(e, y)), arc

    def siamese():
        head = SiameseBinaryHead(dim)
        return (lambda e, y: siamese_binary_loss(e, y, head)), head

    rows = {
        "contrastive": (lambda: (contrastive_loss, None), False),
        "triplet all": (ours_triplet("all"), False),
        "triplet semihard": (ours_triplet("semihard"), False),
        "triplet batch-hard": (ours_triplet("batch-hard"), False),
        "triplet facenet": (ours_triplet("facenet"), False),
        "Symm + triplet all": (ours_triplet("all", "symmetrical"), False),
        "Symm + triplet semihard": (ours_triplet("semihard", "symmetrical"), False),
        "Symm + triplet batch-hard": (ours_triplet("batch-hard", "symmetrical"), False),
        "Symm + triplet facenet": (ours_triplet("facenet", "symmetrical"), False),
        "n-pair": (lambda: (npair, None), False),
        "Symm + n-pair": (lambda: (lambda e, y: npair(e, y, "symmetrical"), None), False),
        "ArcFace": (arcface, False),
        "Siamese binary": (siamese, False),
    }
    if PML_MISSING is None:
        def pml_triplet(miner):
            loss = pml_losses.TripletMarginLoss(margin=MARGIN)
            return lambda: (lambda e, y: loss(e, y, miner(e, y)), None)

        def pml_arcface():
            arc = pml_losses.ArcFaceLoss(num_classes, dim, margin=math.degrees(ARC_MARGIN), scale=ARC_SCALE)
            return (lambda e, y: arc(e, y)), arc

        # PML's NPairsLoss keeps one pair per identity of the batch (the first two samples here);
        # scaled unit embeddings give its dot products our temperature: s a.p = (sqrt(s) a).(sqrt(s) p)
        pml_npair = pml_losses.NPairsLoss(distance=pml_distances.DotProductSimilarity(normalize_embeddings=False))
        rows.update({
            "PML contrastive": (lambda: (pml_losses.ContrastiveLoss(), None), True),
            "PML triplet all": (pml_triplet(pml_miners.TripletMarginMiner(MARGIN, type_of_triplets="all")), True),
            "PML triplet semihard": (pml_triplet(pml_miners.TripletMarginMiner(MARGIN, type_of_triplets="semihard")),
                                     True),
            "PML triplet batch-hard": (pml_triplet(pml_miners.BatchHardMiner()), True),
            "PML n-pair": (lambda: (lambda e, y: pml_npair(math.sqrt(NPAIR_SCALE) * F.normalize(e), y), None), True),
            "PML ArcFace": (pml_arcface, True),
        })
    return rows


def evaluate(emb: torch.Tensor, labels: torch.Tensor, seed: int) -> dict:
    emb = F.normalize(emb.detach(), dim=1)
    out = retrieval_metrics(emb, labels)
    out.update(clustering_metrics(emb, labels, seed=seed))
    dist, same = verification_pairs(emb, labels, max_pairs=20_000, seed=seed)
    out.update(verification_metrics(dist, same, seed=seed))
    return out


def train_and_evaluate(builder, x_train, y_train, x_test, y_test, seed: int, args) -> dict:
    torch.manual_seed(seed)  # the same initial network for every loss of a seed
    model = SmallCNN(args.dim)
    loss_fn, extra = builder()
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    opt = torch.optim.Adam(params, lr=args.lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for idx in pk_batches(y_train, args.steps, P, K, g):
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return evaluate(model(x_test), y_test, seed)


def quality(args) -> dict:
    x, y = load_digits()
    seeds = list(range(args.seed, args.seed + args.seeds))
    probe = methods(args.dim, 5)
    names = [n for n in probe if not args.only or any(o.lower() in n.lower() for o in args.only)]
    if PML_MISSING:
        print(f"PML rows skipped: {PML_MISSING}")
    runs = [(s, seed, n) for s in SPLITS for seed in seeds for n in ["raw pixels", "untrained network"] + names]
    results: dict = {}
    start = time.perf_counter()
    trained_done, trained_total = 0, sum(n in names for _, _, n in runs)
    for i, (split, seed, name) in enumerate(runs):
        train_classes, test_classes = SPLITS[split]
        tr, te = torch.isin(y, torch.tensor(train_classes)), torch.isin(y, torch.tensor(test_classes))
        x_test, y_test = x[te], y[te]
        t0 = time.perf_counter()
        if name == "raw pixels":
            r = evaluate(x_test, y_test, seed)
        elif name == "untrained network":
            torch.manual_seed(seed)
            with torch.no_grad():
                r = evaluate(SmallCNN(args.dim).eval()(x_test), y_test, seed)
        else:
            y_train = torch.searchsorted(torch.tensor(train_classes), y[tr])  # 0..4 for ArcFace
            r = train_and_evaluate(methods(args.dim, 5)[name][0], x[tr], y_train, x_test, y_test, seed, args)
            trained_done += 1
        results.setdefault(name, []).append({"split": split, "seed": seed, **_flat(r)})
        elapsed = time.perf_counter() - start
        eta = elapsed / max(trained_done, 1) * (trained_total - trained_done)
        print(f"[{i + 1}/{len(runs)}] {split} seed {seed} {name}: MAP@R {100 * r['map_at_r']:.1f} "
              f"R@1 {100 * r['precision_at_1']:.1f} ({time.perf_counter() - t0:.1f} s; elapsed "
              f"{elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)", flush=True)
    print_quality_table(results, args)
    return results


def _flat(r: dict) -> dict:
    out = {k: v for k, v in r.items() if k != "recall_at_k"}
    out.update({f"recall_at_{k}": v for k, v in r["recall_at_k"].items()})
    return out


def print_quality_table(results: dict, args) -> None:
    runs = len(next(iter(results.values())))
    print(f"\nOpen-set digits, mean +- std over {runs} runs ({len(SPLITS)} splits x {args.seeds} seeds), "
          f"{args.steps} steps of {P} x {K} at lr {args.lr:g}, percent:\n")
    print("| loss | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, rs in results.items():
        cells = []
        for _, key in COLUMNS:
            v = [100 * r[key] for r in rs]
            cells.append(f"{statistics.mean(v):.1f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if PML_MISSING:
        print(f"\n(PML rows skipped: {PML_MISSING})")


# ---------------------------------------------------------------- speed benchmark

SPEED_CASES = ["triplet all", "triplet semihard", "triplet hard", "triplet batch-hard", "contrastive", "ArcFace"]
IDENTITIES, DIM = 64, 128


def speed_inputs(n: int):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, DIM, generator=g), torch.arange(n) % IDENTITIES


def speed_fns(case: str) -> dict:
    """impl -> f(emb, labels) -> loss, for one case."""
    kind = case.split()[-1]
    if case.startswith("triplet"):
        ours = lambda e, y: triplet_loss(e, y, MARGIN, kind)  # noqa: E731
    elif case == "contrastive":
        ours = contrastive_loss
    else:
        torch.manual_seed(0)
        arc = ArcFaceLoss(IDENTITIES, DIM, 64.0, 0.5)
        ours = lambda e, y: arc(e, y)  # noqa: E731
    fns = {"ours": ours}
    if PML_MISSING is None:
        if case == "triplet batch-hard":
            miner = pml_miners.BatchHardMiner()
        elif case.startswith("triplet"):
            miner = pml_miners.TripletMarginMiner(MARGIN, type_of_triplets=kind)
        if case.startswith("triplet"):
            loss = pml_losses.TripletMarginLoss(margin=MARGIN)
            fns["PML"] = lambda e, y: loss(e, y, miner(e, y))
        elif case == "contrastive":
            fns["PML"] = pml_losses.ContrastiveLoss()
        else:
            pml_arc = pml_losses.ArcFaceLoss(IDENTITIES, DIM, margin=math.degrees(0.5), scale=64.0)
            with torch.no_grad():
                pml_arc.W.copy_(arc.weight.T)
            fns["PML"] = lambda e, y: pml_arc(e, y)
    return fns


def pml_triplet_bytes(case: str, n: int) -> float:
    """What PML's TripletMarginMiner allocates for its triplet indices alone (3 x int64 per
    triplet of the batch: N (K - 1) (N - K)); its N^3 mask comes on top below 2^31 elements."""
    if not case.startswith("triplet") or case.endswith("batch-hard"):
        return 0.0
    k = n // IDENTITIES
    return 3 * 8 * n * (k - 1) * (n - k)


def memory_probe(case: str, n: int, impl: str, cap_gib: float) -> None:
    """In a fresh process: peak resident memory of one forward + backward above the inputs,
    after a warm-up at N = 16 (one-time initialisation is not the loss's memory). The parent
    fixes glibc's mmap threshold, so freed blocks go back to the system and the peak is live
    memory, not what a previous call left cached."""
    fn = speed_fns(case)[impl]
    emb, labels = torch.randn(16, DIM), torch.arange(16) % 4
    fn(emb.requires_grad_(), labels).backward()
    emb, labels = speed_inputs(n)
    emb.requires_grad_()
    status = open("/proc/self/status").read()
    vm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize"))) * 1024
    cap = vm + int(cap_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    try:
        fn(emb, labels).backward()
    except (RuntimeError, MemoryError) as e:
        print(json.dumps({"peak": None, "error": str(e).splitlines()[0][:120]}))
        return
    hwm = int(next(line.split()[1] for line in open("/proc/self/status").read().splitlines()
                   if line.startswith("VmHWM"))) * 1024
    print(json.dumps({"peak": hwm - rss}))


def run_probe(case: str, n: int, impl: str, args) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--memory-cap", str(args.memory_cap),
           "--memory-probe", case, str(n), impl]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as e:
        return {"peak": None, "error": type(e).__name__}


def timed(fn, emb, labels) -> float:
    e = emb.clone().requires_grad_()
    t = time.perf_counter()
    fn(e, labels).backward()
    return time.perf_counter() - t


def speed(args) -> dict:
    if PML_MISSING:
        print(f"PML columns skipped: {PML_MISSING}")
    cap = args.memory_cap * 2 ** 30
    rows = []
    for n in args.sizes:
        emb, labels = speed_inputs(n)
        for case in SPEED_CASES:
            if args.only and not any(o in case for o in args.only):
                continue
            fns = speed_fns(case)
            pml_fits = pml_triplet_bytes(case, n) < cap
            impls = [i for i in fns if i == "ours" or pml_fits]
            times = {i: [] for i in impls}
            for i in impls:  # warm-up
                timed(fns[i], emb, labels)
            for _ in range(args.repeats):  # interleaved: ours, PML, ours, PML, ...
                for i in impls:
                    times[i].append(timed(fns[i], emb, labels))
            row = {"case": case, "N": n, **{f"time_{i}": statistics.median(t) for i, t in times.items()}}
            for i in fns:
                probe = run_probe(case, n, i, args)
                row[f"memory_{i}"] = probe.get("peak")
                if probe.get("error"):
                    row[f"memory_{i}_error"] = probe["error"]
            if "PML" in fns and not pml_fits:
                row["PML_note"] = (f"not timed: its triplet indices alone need "
                                   f"{pml_triplet_bytes(case, n) / 2 ** 30:.0f} GiB")
            rows.append(row)
            print(_speed_line(row, args), flush=True)
    print_speed_table(rows, args)
    return {"rows": rows}


def _mib(b):
    return "-" if b is None else f"{b / 2 ** 20:.0f} MiB"


def _speed_line(r: dict, args) -> str:
    pml_t = r.get("time_PML")
    ratio = f"{r['time_ours'] / pml_t:.2f}" if pml_t else "-"
    return (f"N={r['N']} {r['case']}: ours {1e3 * r['time_ours']:.1f} ms, PML "
            f"{'-' if pml_t is None else f'{1e3 * pml_t:.1f} ms'} (ratio {ratio}); memory ours "
            f"{_mib(r.get('memory_ours'))}, PML {_mib(r.get('memory_PML'))}"
            + (f" [{r['memory_PML_error']}]" if r.get("memory_PML_error") else ""))


def print_speed_table(rows, args) -> None:
    print(f"\nForward + backward with mining, D = {DIM}, {IDENTITIES} identities, CPU, {args.threads} thread(s); "
          f"median of {args.repeats}, interleaved; memory: peak above the inputs, one pass, fresh process "
          f"(capped at {args.memory_cap:g} GiB):\n")
    print("| loss | N | ours | PML | time ours / PML | memory ours | memory PML | memory ours / PML |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pml_t, m_o, m_p = r.get("time_PML"), r.get("memory_ours"), r.get("memory_PML")
        t_ratio = f"**{r['time_ours'] / pml_t:.2f}**" if pml_t else (
            "PML not installed" if PML_MISSING else "PML cannot run")
        if m_p is None and r.get("memory_PML_error"):
            m_ratio = f"< {m_o / (args.memory_cap * 2 ** 30):.3f}" if m_o else "-"
            m_pml = f"> {args.memory_cap:g} GiB (stopped)"
        else:
            m_ratio = f"**{m_o / m_p:.2f}**" if m_o and m_p else "-"
            m_pml = _mib(m_p)
        pml_time = f"{1e3 * pml_t:.1f} ms" if pml_t else "-"
        print(f"| {r['case']} | {r['N']} | {1e3 * r['time_ours']:.1f} ms | {pml_time} | {t_ratio} | "
              f"{_mib(m_o)} | {m_pml} | {m_ratio} |")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        case, n, impl = args.memory_probe
        return memory_probe(case, int(n), impl, args.memory_cap)
    if args.speed and torch.cuda.is_available():
        print("(a GPU is present; these figures are CPU figures)")
    out = speed(args) if args.speed else quality(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": out}, indent=1))


if __name__ == "__main__":
    main()
