"""Do two training runs end in the same model? Compares their ``last.pth`` weights and ``metrics.jsonl``.

Made for the DDP check of ``gpu_check.sh`` (``torchrun`` on N GPUs against one process with the same options and
seed), usable for any two runs that should agree (another loader worker count, a resumed run, another machine).

    python -m benchmarks.compare_runs RUN_A RUN_B                    # run directories (or their last.pth)
    python -m benchmarks.compare_runs RUN_A RUN_B --atol 1e-3 --metric_atol 0.5

Prints the largest weight difference (the attention key biases apart: see ``split_key_biases``) with the tensor that
has it, the key biases' largest difference, and the metrics of each epoch side by side. Exit status 1 when a weight
differs by more than ``--atol`` or a metric by more than ``--metric_atol``, 2 when the runs cannot be compared (other
tensors, other epochs).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch


from utils.checkpoint import model_state_dict, read_checkpoint
from utils.run_dir import LAST_CHECKPOINT, METRICS_FILE, read_jsonl, resolve_run


def split_key_biases(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(``tensors`` without the attention key biases, the key biases). An attention's ``in_proj_bias`` is the
    [query | key | value] biases; the key bias adds one constant to all logits of a query, which the softmax ignores,
    so its gradient is zero up to float noise (~1e-7), which Adam's ``m / (sqrt(v) + eps)`` with eps 1e-8 turns into
    steps of up to lr: these elements drift apart between any two float orders, without effect on any output."""
    rest, key_biases = {}, {}
    for name, t in tensors.items():
        if name.endswith("in_proj_bias"):
            d = t.numel() // 3
            rest[name] = torch.cat([t[:d], t[2 * d:]])
            key_biases[name] = t[d:2 * d]
        else:
            rest[name] = t
    return rest, key_biases


def run_files(path: str) -> Tuple[str, Optional[str]]:
    """A run directory or its last.pth -> (the checkpoint, metrics.jsonl beside it or None)."""
    run_dir, ckpt = resolve_run(path, LAST_CHECKPOINT, "checkpoint")
    metrics = os.path.join(run_dir, METRICS_FILE)
    return ckpt, metrics if os.path.isfile(metrics) else None


def read_metrics(path: Optional[str]) -> List[dict]:
    if path is None:
        return []
    records, bad = read_jsonl(path, METRICS_FILE)
    if bad:
        raise ValueError(f"{path}: line(s) {bad[:5]} are not JSON records")
    return [rec for _, rec in records]


def largest_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Tuple[float, str]:
    """(max |a - b| over every element of every tensor, the tensor that has it); keys and shapes must match."""
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"the runs have different tensors: {only[:5]}{' ...' if len(only) > 5 else ''}")
    worst, where = 0.0, ""
    for name in a:
        if a[name].shape != b[name].shape:
            raise ValueError(f"{name}: shape {tuple(a[name].shape)} vs {tuple(b[name].shape)}")
        if not a[name].numel() or not a[name].is_floating_point():
            continue
        d = float((a[name].double() - b[name].double()).abs().max())
        if d > worst or not where:
            worst, where = d, name
    return worst, where


def compare(run_a: str, run_b: str) -> dict:
    """The differences between two runs: weights (key biases apart), key biases, metrics per epoch."""
    (ckpt_a, met_a), (ckpt_b, met_b) = run_files(run_a), run_files(run_b)
    wa, kba = split_key_biases(model_state_dict(read_checkpoint(ckpt_a, mmap=False)))
    wb, kbb = split_key_biases(model_state_dict(read_checkpoint(ckpt_b, mmap=False)))
    weights, where = largest_difference(wa, wb)
    key_biases, kb_where = largest_difference(kba, kbb) if kba or kbb else (0.0, "")
    ma, mb = read_metrics(met_a), read_metrics(met_b)
    if [m.get("epoch") for m in ma] != [m.get("epoch") for m in mb]:
        raise ValueError(f"the runs logged other epochs: {[m.get('epoch') for m in ma]} vs "
                         f"{[m.get('epoch') for m in mb]}")
    metrics = []
    for x, y in zip(ma, mb):
        for k in sorted(set(x) & set(y)):
            if k != "epoch" and isinstance(x[k], (int, float)) and isinstance(y[k], (int, float)):
                metrics.append((x["epoch"], k, x[k], y[k]))
    return dict(weights=weights, weights_tensor=where, key_biases=key_biases, key_biases_tensor=kb_where,
                metrics=metrics)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--atol", type=float, default=1e-5, help="largest weight difference allowed (fp32 float noise)")
    p.add_argument("--metric_atol", type=float, default=1e-4, help="largest metric difference allowed")
    opt = p.parse_args(argv)
    try:
        r = compare(opt.run_a, opt.run_b)
    except (ValueError, FileNotFoundError) as e:
        print(f"cannot compare: {e}")
        return 2
    print(f"weights: largest difference {r['weights']:.3e} ({r['weights_tensor']}); attention key biases "
          f"{r['key_biases']:.3e} (zero gradient: they drift with float noise)")
    worst_metric = 0.0
    for epoch, k, a, b in r["metrics"]:
        worst_metric = max(worst_metric, abs(a - b))
        print(f"epoch {epoch} {k}: {a:.6g} vs {b:.6g}")
    ok = r["weights"] <= opt.atol and worst_metric <= opt.metric_atol
    print(("SAME" if ok else "DIFFERENT") + f" within --atol {opt.atol:g} / --metric_atol {opt.metric_atol:g} "
          f"(largest metric difference {worst_metric:.3g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
