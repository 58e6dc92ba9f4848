"""Smoke runs of the benchmark scripts at tiny sizes, so that they keep working (figures are not asserted here:
speed targets live in the scripts' output, see README)."""
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
