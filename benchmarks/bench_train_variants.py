"""The full-size IRRA training step, measured: the original computation vs ours vs ours with --grad_checkpointing.

Variants (same random weights, same batch, the original's options otherwise):
  original   ``model.fast = False``, the original's per-parameter Adam (torch's default implementation), its step
             order (gradients freed after the forward) and nn.MultiheadAttention's forward (``--no-fused_attention``)
  ours       ``model.fast = True`` (same numbers; see bench_train_step.py), the same Adam updates with one param group
             per (lr, weight decay) (``--param_groups per_parameter``: the original's layout; ``--fused_optimizer``:
             fused), the previous step's gradients freed before the forward, as the trainer does, attention by
             F.scaled_dot_product_attention (``--no-fused_attention``: nn.MultiheadAttention's forward)
  ours_ckpt  ours + ``--grad_checkpointing`` (the transformer blocks are recomputed in backward)

Each variant runs in a fresh subprocess, so that memory peaks do not mix: it builds the model (a ``scratch:``
architecture: OpenAI shapes, random weights, nothing to download) and the optimizer, runs ``--warmup`` untimed and
``--runs`` timed steps (median), reads the peak memory, then counts the FLOPs of one more step with
``torch.utils.flop_counter.FlopCounterMode`` (matmul / conv / attention, forward + backward, recomputation included)
and its memory traffic with ``TrafficCounter`` (bytes read and written by every non-view operator, the eager model:
what a memory-bound step costs).
Peak memory: on CPU the process's peak RSS (VmHWM: model, optimizer state, batch, activations, and what the C
allocator keeps of freed memory); on an accelerator the device's max_memory_allocated.

On CPU, glibc keeps much of the freed activation memory mapped (its mmap threshold grows up to 32 MB after large
frees), so the RSS peak lies well above the live tensors and varies from run to run; ``MALLOC_MMAP_THRESHOLD_=131072``
in the environment fixes the threshold and brings the RSS close to the live memory (printed in the header when set).

    python -m benchmarks.bench_train_variants                               # ViT-B/16, 384x128, bs 8, all three
    python -m benchmarks.bench_train_variants --batch_size 16 --warmup 1 --runs 1 --variants ours ours_ckpt
                                                                            # memory: build + 2 training steps
    python -m benchmarks.bench_train_variants --device auto --precision amp_bf16 --batch_size 64
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch


from benchmarks.bench_train_step import make_batch
from model.build import build_model
from utils.choices import PRECISIONS
from model.clip_model import SCRATCH_ARCHS, SCRATCH_PREFIX
from processor.processor import prepare_batch, train_step
from solver import build_optimizer
from utils.comm import resolve_device
from utils.options import get_args
from datasets.cuhkpedes import TRAIN_IDS  # CUHK-PEDES's identities: the full-size id head

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the workers run as python -m from here
VARIANTS = ("original", "ours", "ours_ckpt")
RESULT_TAG = "RESULT "  # the worker's last stdout line: RESULT {json}
GB = 1e9


def scratch_name(arch: str) -> str:
    """'ViT-B/16' or 'scratch:ViT-B/16' -> 'scratch:ViT-B/16'; unknown names raise with the valid ones."""
    name = arch[len(SCRATCH_PREFIX):] if arch.startswith(SCRATCH_PREFIX) else arch
    if name not in SCRATCH_ARCHS:
        raise SystemExit(f"--arch {arch!r}: unknown; valid: {', '.join(SCRATCH_ARCHS)} (random weights, "
                         f"optionally prefixed with {SCRATCH_PREFIX!r})")
    return SCRATCH_PREFIX + name


def cpu_peak_rss() -> int:
    """Peak resident set size of this process in bytes (/proc/self/status VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux


def cpu_rss() -> int:
    """Current resident set size in bytes (VmRSS), 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def accel_memory_module(device: torch.device):
    """The memory-statistics API of the accelerator: torch.accelerator's generic one when this torch has it,
    else the backend module (``getattr(torch, device.type)``)."""
    if all(hasattr(torch.accelerator, f) for f in ("memory_allocated", "max_memory_allocated",
                                                   "reset_peak_memory_stats")):
        return torch.accelerator
    return getattr(torch, device.type)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def flop_counter():
    """FlopCounterMode that also counts CPU flash attention (not in torch's table), with torch's SDPA formulas."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    custom = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry and fwd.default not in fc.flop_registry:
        custom[fwd] = lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
    if bwd is not None and bwd not in fc.flop_registry and bwd.default not in fc.flop_registry:
        custom[bwd] = lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)
    return fc.FlopCounterMode(display=False, custom_mapping=custom)


def profile_step(step, device: torch.device, rows: int) -> Tuple[str, Optional[float]]:
    """One more step under torch.profiler: the ``rows`` operators with the most self time on the device (on the CPU
    when there is no accelerator), as torch's table, and the seconds the device was busy (the sum of every
    operator's self device time; None without an accelerator)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    accel = getattr(ProfilerActivity, device.type.upper(), None)  # the accelerator's activity (CUDA, XPU, ...)
    if device.type != "cpu" and accel is not None:
        activities.append(accel)
    synchronize(device)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    sort = f"self_{device.type}_time_total" if len(activities) > 1 else "self_cpu_time_total"
    averages = prof.key_averages()
    busy = sum(e.self_device_time_total for e in averages) * 1e-6 if len(activities) > 1 else None
    return averages.table(sort_by=sort, row_limit=rows), busy


class TrafficCounter:
    """Bytes read and written by the operators of a step: for every aten operator that is not a view (nor a view in
    all but name, such as ``_unsafe_view``), the sizes of its tensor inputs plus its tensor outputs (forward and
    backward, as ``FlopCounterMode``). It models eager execution without caches: each operator reads its inputs from
    memory and writes its outputs there. Use as a context manager; ``total`` holds the count."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not func.is_view and not _aliases_inputs(func, (args, kwargs or {}), out):
                    counter.total += _tensor_bytes((args, kwargs or {})) + _tensor_bytes(out)
                return out

        self.total = 0
        self._mode = _Mode()

    def __enter__(self) -> "TrafficCounter":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def _aliases_inputs(func, inputs, out) -> bool:
    """True when a non-mutating ``func`` returned only tensors that share an input's storage (no data moved)."""
    from torch.utils._pytree import tree_leaves

    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not outs or func._schema.is_mutable:
        return False
    ptrs = {t.untyped_storage().data_ptr() for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)}
    return all(t.untyped_storage().data_ptr() in ptrs for t in outs)


def _tensor_bytes(tree) -> int:
    from torch.utils._pytree import tree_leaves

    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


# ----------------------------------------------------------------------------------------------------------------
# worker: one variant in this process
# ----------------------------------------------------------------------------------------------------------------
def run_variant(opt: argparse.Namespace, variant: str) -> Dict[str, object]:
    """Build, warm up, time, read the peak memory, count one step's FLOPs; returns the figures of this process."""
    if opt.threads:
        torch.set_num_threads(opt.threads)
    device = resolve_device(opt.device)
    argv = ["--pretrain_choice", scratch_name(opt.arch), "--img_size", *map(str, opt.img_size),
            "--loss_names", opt.loss_names, "--cmt_depth", str(opt.cmt_depth), "--text_length", str(opt.text_length),
            "--precision", opt.precision, "--device", str(device)]
    if variant == "ours_ckpt":
        argv.append("--grad_checkpointing")
    # the original: nn.MultiheadAttention's forward, exact cuts; ours: --fused_attention (default) and --length_bucket
    argv.append("--fused_attention" if opt.fused_attention and variant != "original" else "--no-fused_attention")
    argv += ["--length_bucket", str(1 if variant == "original" else opt.length_bucket)]
    if opt.fused_optimizer and variant != "original":
        argv.append("--fused_optimizer")
    # the original: one Adam param group per parameter; ours: the trainer's default (merged) unless --param_groups
    if variant == "original" or opt.param_groups == "per_parameter":
        argv.append("--no-merge_param_groups")
    args = get_args(argv)
    mem = None if device.type == "cpu" else accel_memory_module(device)

    torch.manual_seed(0)  # same weights in every variant
    model = build_model(args, opt.num_classes, device=device).to(device)
    model.train()
    model.fast = variant != "original"
    optimizer = build_optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp_fp16" else None
    host_batch = make_batch(opt.batch_size, tuple(opt.img_size), opt.text_length, opt.num_classes)
    batch = prepare_batch(model, host_batch, device)  # as the trainer: lengths from the host batch, then the copy
    synchronize(device)
    after_build = cpu_rss() if mem is None else mem.memory_allocated()
    if mem is not None:
        mem.reset_peak_memory_stats()

    free_grads_first = variant != "original"  # ours frees them before the forward (train_one_epoch), the original after

    def step() -> float:
        """The trainer's step (processor.processor.train_step), then a host sync as the trainer's logging."""
        _, loss = train_step(model, batch, optimizer, scaler, args.precision, free_grads_first=free_grads_first)
        return float(loss.detach())

    clock = time.perf_counter if opt.clock == "wall" else time.process_time
    first_loss = step()
    for _ in range(opt.warmup - 1):
        step()
    times: List[float] = []
    for _ in range(opt.runs):
        synchronize(device)
        t0 = clock()
        step()
        synchronize(device)
        times.append(clock() - t0)
    peak = cpu_peak_rss() if mem is None else mem.max_memory_allocated()
    profile, busy_s = profile_step(step, device, opt.profile) if opt.profile else (None, None)
    # FLOPs and bytes moved of one more step, after the peak was read (so that the counters cannot affect it)
    counter, traffic = flop_counter(), TrafficCounter()
    with counter, traffic:
        step()
    flops = counter.get_total_flops()
    return dict(variant=variant, device=str(device), threads=torch.get_num_threads(), first_loss=first_loss,
                flops_per_sample=flops / opt.batch_size, bytes_per_sample=traffic.total / opt.batch_size,
                step_s=times, median_s=statistics.median(times),
                mem_after_build=after_build, mem_peak=peak, mem_kind="peak RSS" if mem is None else
                "max_memory_allocated", profile=profile, device_busy_s=busy_s)


# ----------------------------------------------------------------------------------------------------------------
# driver: one subprocess per variant, then the table
# ----------------------------------------------------------------------------------------------------------------
def spawn(argv: List[str], variant: str) -> Dict[str, object]:
    cmd = [sys.executable, "-m", "benchmarks.bench_train_variants", *argv, "--worker", variant]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def report(opt: argparse.Namespace, results: Dict[str, Dict[str, object]]) -> None:
    first = next(iter(results.values()))
    print(f"arch {scratch_name(opt.arch)}, img {tuple(opt.img_size)}, bs {opt.batch_size}, {opt.loss_names}, "
          f"cmt_depth {opt.cmt_depth}, precision {opt.precision}, device {first['device']}, threads "
          f"{first['threads']}, ours: fused_attention {opt.fused_attention}, length_bucket {opt.length_bucket}, "
          f"{opt.warmup} warm-up + {opt.runs} timed steps per variant ({opt.clock} clock), each in "
          f"a fresh process" + (f", MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
                                if "MALLOC_MMAP_THRESHOLD_" in os.environ else ""))
    print(f"{'variant':10} {'ms/step':>9} {'samples/s':>10} {'GFLOP/sample':>13} {'GB moved/sample':>16} "
          f"{'mem after build':>16} "
          f"{first['mem_kind'] + ' (GB)':>24}  first-step loss   steps (ms)")
    for v, r in results.items():
        print(f"{v:10} {r['median_s'] * 1e3:9.0f} {opt.batch_size / r['median_s']:10.2f} "
              f"{r['flops_per_sample'] / 1e9:13.1f} {r['bytes_per_sample'] / GB:16.2f} "
              f"{r['mem_after_build'] / GB:16.2f} {r['mem_peak'] / GB:24.2f}  "
              f"{r['first_loss']:.6f}  " + ", ".join(f"{t * 1e3:.0f}" for t in r["step_s"]))

    for v, r in results.items():
        extra = []
        if r.get("device_busy_s") is not None:  # profiled: the device's busy time against the unprofiled median step
            extra.append(f"device busy {r['device_busy_s'] * 1e3:.1f} ms of the {r['median_s'] * 1e3:.1f} ms step "
                         f"({r['device_busy_s'] / r['median_s']:.0%}, torch.profiler)")
        if opt.peak_tflops:
            achieved = r["flops_per_sample"] * opt.batch_size / r["median_s"]
            extra.append(f"{achieved / 1e12:.1f} TFLOP/s counted, MFU {achieved / (opt.peak_tflops * 1e12):.1%} of "
                         f"{opt.peak_tflops:g} TFLOP/s")
        if extra:
            print(f"{v}: " + "; ".join(extra))

    def ratio(a: str, b: str, key: str) -> Optional[float]:
        return results[a][key] / results[b][key] if a in results and b in results else None

    speed = ratio("original", "ours", "median_s")
    if speed is not None:
        print(f"ours vs original: {speed:.2f}x samples/s measured, {ratio('original', 'ours', 'flops_per_sample'):.2f}x"
              f" fewer FLOPs and {ratio('original', 'ours', 'bytes_per_sample'):.2f}x fewer bytes moved per sample")
    mem = ratio("ours_ckpt", "ours", "mem_peak")
    if mem is not None:
        print(f"grad checkpointing vs ours: peak memory {results['ours']['mem_peak'] / GB:.2f} -> "
              f"{results['ours_ckpt']['mem_peak'] / GB:.2f} GB ({(mem - 1) * 100:+.0f}%), "
              f"speed {1 / ratio('ours_ckpt', 'ours', 'median_s'):.2f}x, "
              f"FLOPs {ratio('ours_ckpt', 'ours', 'flops_per_sample'):.2f}x")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B/16",
                   help=f"architecture (random weights): one of {', '.join(SCRATCH_ARCHS)}, with or without "
                        f"{SCRATCH_PREFIX!r}")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--img_size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    p.add_argument("--text_length", type=int, default=77)
    p.add_argument("--loss_names", default="sdm+mlm+id")
    p.add_argument("--cmt_depth", type=int, default=4)
    p.add_argument("--num_classes", type=int, default=TRAIN_IDS)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (>= 1)")
    p.add_argument("--runs", type=int, default=3, help="timed steps (median)")
    p.add_argument("--device", default="auto", help="auto (the accelerator if there is one) | cpu")
    p.add_argument("--precision", default="fp32", choices=[c for c in PRECISIONS if c != "auto"])
    p.add_argument("--fused_optimizer", action="store_true", help="fused Adam for ours / ours_ckpt")
    p.add_argument("--param_groups", choices=("merged", "per_parameter"), default="merged",
                   help="ours / ours_ckpt: merged (one Adam group per lr and weight decay, the trainer's default) or "
                        "per_parameter (the original's, --no-merge_param_groups)")
    p.add_argument("--fused_attention", default=True, action=argparse.BooleanOptionalAction,
                   help="ours / ours_ckpt: attention by F.scaled_dot_product_attention (the default; the original "
                        "variant always uses nn.MultiheadAttention's forward)")
    p.add_argument("--length_bucket", type=int, default=1, metavar="N",
                   help="ours / ours_ckpt: the trainer's --length_bucket (caption cut and MLM shapes rounded up)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: time.perf_counter; cpu: time.process_time (CPU seconds of the worker: less sensitive to "
                        "other processes on a shared machine; use with --threads 1)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile one step (torch.profiler) and print its ROWS most costly operators")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="the device's peak TFLOP/s in this precision (e.g. 989 for an H100/H200 SXM in dense "
                        "fp16/bf16): also report MFU = counted FLOPs per second / peak")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    opt = build_parser().parse_args(argv)
    scratch_name(opt.arch)
    if opt.warmup < 1 or opt.runs < 1 or opt.batch_size < 1:
        raise SystemExit("--warmup, --runs and --batch_size must be >= 1")
    if opt.json and os.path.exists(opt.json):
        raise SystemExit(f"--json {opt.json}: exists; not overwritten")
    if opt.worker:
        print(RESULT_TAG + json.dumps(run_variant(opt, opt.worker)), flush=True)
        return
    results = {}
    for v in opt.variants:
        results[v] = spawn(argv, v)
        r = results[v]
        print(f"[{v}] done: {r['median_s'] * 1e3:.0f} ms/step, peak {r['mem_peak'] / GB:.2f} GB", flush=True)
        if r.get("profile"):
            print(f"[{v}] profile of one step:\n{r['profile']}", flush=True)
    report(opt, results)
    if opt.json:
        with open(opt.json, "w") as f:
            json.dump({"options": {k: v for k, v in vars(opt).items() if k != "worker"}, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
