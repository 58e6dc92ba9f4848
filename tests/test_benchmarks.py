"""Smoke runs of the benchmark scripts at tiny sizes, so that they keep working (figures are not asserted here:
speed targets live in the scripts' output, see README)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_bench_train_step_small():
    out = run("benchmarks/bench_train_step.py", "--arch", "scratch:ViT-Micro", "--batch_size", "4", "--img_size",
              "64", "32", "--cmt_depth", "1", "--warmup", "0", "--runs", "1", "--adam", "plain")
    assert "speed-up fast/full (plain Adam)" in out
    diff = float(out.split("max |fast - full| over the forward dict:")[1].split()[0])
    assert diff < 1e-4  # both paths give the same numbers


def test_bench_eval_small():
    out = run("benchmarks/bench_eval.py", "--small")
    assert "speed-up vs naive" in out and "ours vs naive" in out


def test_bench_train_variants_small(tmp_path):
    """original / ours / ours + --grad_checkpointing, each in its own process, at tiny size."""
    out_json = str(tmp_path / "variants.json")
    out = run("benchmarks/bench_train_variants.py", "--arch", "scratch:ViT-Micro", "--batch_size", "4", "--img_size",
              "64", "32", "--cmt_depth", "1", "--warmup", "1", "--runs", "1", "--device", "cpu", "--precision", "fp32",
              "--json", out_json)
    assert "ours vs original:" in out and "grad checkpointing vs ours: peak memory" in out
    with open(out_json) as f:
        res = json.load(f)["results"]
    assert list(res) == ["original", "ours", "ours_ckpt"]
    # same weights and batch in the three processes: the same first-step loss (ckpt is exact, fast up to rounding)
    assert res["ours_ckpt"]["first_loss"] == res["ours"]["first_loss"]
    assert abs(res["ours"]["first_loss"] - res["original"]["first_loss"]) < 1e-4
    # the fast path skips the MLM head at unmasked positions; checkpointing recomputes the blocks' forward
    assert res["original"]["flops_per_sample"] > res["ours"]["flops_per_sample"]
    assert res["ours_ckpt"]["flops_per_sample"] > res["ours"]["flops_per_sample"]
    for r in res.values():
        assert r["device"] == "cpu" and r["mem_peak"] >= r["mem_after_build"] > 0 and len(r["step_s"]) == 1
