"""Benchmark of the retrieval-metric step: chunked ``utils.metrics.rank`` vs the original (``rank_naive``).

Size: ICFG-PEDES test split (19,848 text queries x 14,993 gallery images, 4,102 identities); ``--small`` for a
quick run. pids follow the conformance-fixture recipe, similarity = U(0, 1) + 0.15 for positives. The similarity
is generated in fixed row blocks, each from its own seeded generator, so every variant sees the same numbers.

Each variant runs in its own subprocess (separate peak-RSS figures):
  naive        the original rank on the full fp32 similarity matrix
  ours         utils.metrics.rank on the same full matrix (metrics + the top-10 index lists, as the original)
  ours_metrics the same without the top-10 index lists (``need_indices=False``): what the Evaluator needs
  ours_stream  the same chunk routine fed 1024-row blocks in natural query order as they are generated (the matrix
               never exists, as in ``Evaluator``, which forms its chunks from features with ``rank_from_features``);
               slower than ``ours`` because each block is re-sorted by number of positives locally instead of
               the queries being grouped globally. Generation time is excluded from its timing.
Memory figures per variant: "step peak" = peak RSS during the metric step alone (the kernel's peak counter is
reset via /proc/self/clear_refs just before the step, so it includes the inputs already resident, e.g. the 1.2 GB
matrix); "process peak" = VmHWM over the whole subprocess (data generation included, read before the reset).

``--msd``: instead, the extra cost of mSD (utils/msd.py, both variants, as ``--metrics mSD`` asks) at CUHK-PEDES
test size (6,156 queries x 3,074 images, 1,000 ids; ``--small`` for the small size), in one process, the variants
interleaved ``--repeats`` times (medians): the metric step from a similarity matrix (``rank``) and the Evaluator's
from 512-d unit features (``rank_from_features``, the products included), each without and with mSD.

Usage: python -m benchmarks.bench_eval [--small] [--chunk-size N] [--skip-naive] [--msd [--repeats N]]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.reference import rank_naive
from utils.metrics import DEFAULT_CHUNK_SIZE, _rank_chunk, _RankAccumulator, rank, rank_from_features
from utils.msd import MSDAccumulator

REPO = str(Path(__file__).resolve().parents[1])  # the workers run as python -m from here

FULL = dict(nq=19848, ng=14993, npid=4102)
SMALL = dict(nq=3000, ng=2000, npid=600)
CUHK = dict(nq=6156, ng=3074, npid=1000)  # CUHK-PEDES test split
FEATURE_DIM = 512
MSD_TARGET = 0.20  # mSD may add at most 20 % to the evaluation's metric step
SEED = 0
BONUS = 0.15  # similarity bonus of positives
GEN_BLOCK = 1024  # rows per generated similarity block


def make_pids(nq: int, ng: int, npid: int):
    g = torch.Generator().manual_seed(SEED)
    gpids = torch.randint(0, npid, (ng,), generator=g)
    gpids[:npid] = torch.arange(npid)
    qpids = torch.randint(0, npid, (nq,), generator=g)
    return qpids, gpids


def sim_blocks(qpids: torch.Tensor, gpids: torch.Tensor):
    """Yields (row_start, block [b, ng]) of the similarity matrix, deterministic per block."""
    nq, ng = qpids.numel(), gpids.numel()
    for j, s in enumerate(range(0, nq, GEN_BLOCK)):
        e = min(s + GEN_BLOCK, nq)
        g = torch.Generator().manual_seed(SEED * 1_000_003 + j + 1)
        block = torch.rand(e - s, ng, generator=g)  # [b, ng]
        block += BONUS * (qpids[s:e, None] == gpids[None, :]).float()
        yield s, block


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(mode: str, size: dict, chunk_size: int, out: str) -> None:
    qpids, gpids = make_pids(**size)
    if mode in ("naive", "ours", "ours_metrics"):
        sim = torch.empty(size["nq"], size["ng"])
        for s, block in sim_blocks(qpids, gpids):
            sim[s:s + block.shape[0]] = block
        del block
    process_peak_before = _status_kb("VmHWM")
    rss_before = _status_kb("VmRSS")
    reset_ok = _reset_peak()
    t0 = time.perf_counter()
    if mode == "naive":
        cmc, mAP, mINP, indices = rank_naive(sim, qpids, gpids, max_rank=10, get_mAP=True)
        indices = indices[:, :10]
    elif mode == "ours":
        cmc, mAP, mINP, indices = rank(sim, qpids, gpids, max_rank=10, get_mAP=True, chunk_size=chunk_size)
    elif mode == "ours_metrics":  # what the Evaluator computes: the metrics, no top-k index lists
        cmc, mAP, mINP, _ = rank(sim, qpids, gpids, max_rank=10, get_mAP=True, chunk_size=chunk_size,
                                 need_indices=False)
        indices = torch.zeros(size["nq"], 10, dtype=torch.long)  # placeholder: not computed in this mode
    else:  # ours_stream: the chunked computation on blocks as they are produced (generation time excluded)
        acc = _RankAccumulator(get_mAP=True)
        values = []
        gen_time = 0.0
        blocks = sim_blocks(qpids, gpids)
        while True:
            tg = time.perf_counter()
            item = next(blocks, None)
            gen_time += time.perf_counter() - tg
            if item is None:
                break
            s, block = item
            for c in range(0, block.shape[0], chunk_size):
                res = _rank_chunk(block[c:c + chunk_size], qpids[s + c:s + c + chunk_size], gpids, 10, True)
                acc.add(*res)
                values.append(block[c:c + chunk_size].gather(1, res[1]))
        cmc, mAP, mINP, indices = acc.result()
        values = torch.cat(values)
    elapsed = time.perf_counter() - t0
    if mode == "ours_stream":
        elapsed -= gen_time
    else:
        values = sim.gather(1, indices)
    step_peak = _status_kb("VmHWM")
    torch.save({"cmc": cmc, "mAP": mAP, "mINP": mINP, "indices": indices.to(torch.int32), "values": values}, out + ".pt")
    Path(out + ".json").write_text(json.dumps(dict(
        time_s=elapsed, step_peak_kb=step_peak if reset_ok else None, rss_before_kb=rss_before,
        process_peak_kb=max(process_peak_before, step_peak), reset_ok=reset_ok)))


def msd_overhead(size: dict, chunk_size: int, repeats: int) -> None:
    """Print the median time of the metric step without / with mSD (both variants), interleaved runs."""
    import statistics
    qpids, gpids = make_pids(**size)
    sim = torch.empty(size["nq"], size["ng"])
    for s, block in sim_blocks(qpids, gpids):
        sim[s:s + block.shape[0]] = block * 2 - 1  # cosines in [-1, 1]
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randn(size["npid"], FEATURE_DIM, generator=g)
    qf = torch.nn.functional.normalize(ids[qpids] + 2 * torch.randn(size["nq"], FEATURE_DIM, generator=g), dim=1)
    gf = torch.nn.functional.normalize(ids[gpids] + 2 * torch.randn(size["ng"], FEATURE_DIM, generator=g), dim=1)
    steps = {
        "rank": lambda acc: rank(sim, qpids, gpids, chunk_size=chunk_size, need_indices=False, observer=acc),
        "rank_from_features": lambda acc: rank_from_features(qf, gf, qpids, gpids, chunk_size=chunk_size,
                                                             need_indices=False, observer=acc),
    }
    print(f"mSD overhead: {size['nq']} queries x {size['ng']} gallery, {size['npid']} ids, chunk_size={chunk_size}, "
          f"torch threads={torch.get_num_threads()}, {repeats} interleaved repeats (medians)")
    for name, step in steps.items():
        times = {"without": [], "with mSD": []}
        for _ in range(repeats):
            for label in times:
                acc = MSDAccumulator() if label == "with mSD" else None
                t0 = time.perf_counter()
                step(acc)
                times[label].append(time.perf_counter() - t0)
        a, b = statistics.median(times["without"]), statistics.median(times["with mSD"])
        print(f"{name:<19} without {a * 1000:8.1f} ms   with mSD {b * 1000:8.1f} ms   +{(b / a - 1) * 100:5.1f} % "
              f"(target <= {MSD_TARGET * 100:.0f} %); mSD {acc.result()}")


def run_variant(mode: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, mode)
    cmd = [sys.executable, "-m", "benchmarks.bench_eval", "--worker", mode, "--chunk-size", str(args.chunk_size)]
    if args.small:
        cmd.append("--small")
    subprocess.run(cmd + ["--out", out], check=True, cwd=REPO)
    res = json.loads(Path(out + ".json").read_text())
    res["metrics"] = torch.load(out + ".pt", weights_only=True)
    return res


def _gb(kb) -> str:
    return "n/a" if kb is None else f"{kb / 1024 ** 2:.2f} GB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help=f"quick run at {SMALL}")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="queries per chunk (ours)")
    p.add_argument("--skip-naive", action="store_true", help="only run ours (no comparison)")
    p.add_argument("--msd", action="store_true", help="measure the extra cost of mSD at CUHK-PEDES size instead")
    p.add_argument("--repeats", type=int, default=7, help="--msd: interleaved repeats per variant")
    p.add_argument("--worker", choices=["naive", "ours", "ours_metrics", "ours_stream"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.msd:
        msd_overhead(SMALL if args.small else CUHK, args.chunk_size, args.repeats)
        return
    size = SMALL if args.small else FULL
    if args.worker:
        worker(args.worker, size, args.chunk_size, args.out)
        return

    print(f"rank benchmark: {size['nq']} queries x {size['ng']} gallery, {size['npid']} ids, "
          f"chunk_size={args.chunk_size}, torch threads={torch.get_num_threads()}")
    print(f"similarity matrix fp32: {size['nq'] * size['ng'] * 4 / 1024 ** 3:.2f} GB")
    modes = ["ours", "ours_metrics", "ours_stream"] + ([] if args.skip_naive else ["naive"])
    with tempfile.TemporaryDirectory() as tmp:
        res = {m: run_variant(m, args, tmp) for m in modes}
    print(f"{'variant':<12} {'time':>9} {'step peak RSS':>14} {'RSS before step':>16} {'process peak':>13}")
    for m in modes:
        r = res[m]
        print(f"{m:<12} {r['time_s']:>8.2f}s {_gb(r['step_peak_kb']):>14} {_gb(r['rss_before_kb']):>16} "
              f"{_gb(r['process_peak_kb']):>13}")
    ours = res["ours"]["metrics"]
    m = ours
    print(f"metrics (ours): R1 {float(m['cmc'][0]):.3f}  R5 {float(m['cmc'][4]):.3f}  R10 {float(m['cmc'][9]):.3f}  "
          f"mAP {float(m['mAP']):.4f}  mINP {float(m['mINP']):.4f}")
    for other in modes[1:]:
        o = res[other]["metrics"]
        d_cmc = float((o["cmc"] - ours["cmc"]).abs().max())
        d_map, d_minp = abs(float(o["mAP"] - ours["mAP"])), abs(float(o["mINP"] - ours["mINP"]))
        if other == "ours_metrics":  # no index lists to compare
            print(f"ours vs {other}: max |d cmc| {d_cmc:.2e}, |d mAP| {d_map:.2e}, |d mINP| {d_minp:.2e} (percent)")
            assert d_cmc < 1e-4 and d_map < 1e-4 and d_minp < 1e-4, f"metrics differ from {other}"
            continue
        same_vals = torch.equal(o["values"], ours["values"])
        n_diff = int((o["indices"] != ours["indices"]).any(1).sum())
        print(f"ours vs {other}: max |d cmc| {d_cmc:.2e}, |d mAP| {d_map:.2e}, |d mINP| {d_minp:.2e} (percent); "
              f"top-10 scores identical: {same_vals}; rows whose top-10 index order differs: {n_diff} "
              f"(only possible among equal scores: torch.rand has 2^24 levels, so rows hold ties)")
        assert d_cmc < 1e-4 and d_map < 1e-4 and d_minp < 1e-4 and same_vals, f"metrics differ from {other}"
    if not args.skip_naive:
        tn = res["naive"]["time_s"]
        print("speed-up vs naive: " + ", ".join(f"{m} {tn / res[m]['time_s']:.1f}x" for m in modes[:-1])
              + " (target >= 20x)")
        print(f"metric-step peak RSS: naive {_gb(res['naive']['step_peak_kb'])}, "
              + ", ".join(f"{m} {_gb(res[m]['step_peak_kb'])}" for m in modes[:-1])
              + " (ours/ours_metrics include the resident 1.1 GB matrix; target <= 2 GB)")


if __name__ == "__main__":
    main()
