"""Smoke runs of the benchmark scripts at tiny sizes (``python -m benchmarks.x``, as the README runs them), so that they
keep working (figures are not asserted here: speed targets live in the scripts' output, see README)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # python -m from the repository root
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_bench_train_step_small():
    out = run("-m", "benchmarks.bench_train_step", "--arch", "scratch:ViT-Micro", "--batch_size", "4", "--img_size",
              "64", "32", "--cmt_depth", "1", "--warmup", "0", "--runs", "1", "--adam", "plain")
    assert "speed-up fast/full (plain Adam)" in out
    diff = float(out.split("max |fast - full| over the forward dict:")[1].split()[0])
    assert diff < 1e-4  # both paths give the same numbers


def test_bench_train_step_methods_small():
    """--methods irra tbps: each method's own losses and optimizer on the same backbone, batch and images."""
    out = run("-m", "benchmarks.bench_train_step", "--methods", "irra", "tbps", "--arch", "scratch:ViT-Micro",
              "--batch_size", "4", "--img_size", "64", "32", "--cmt_depth", "1", "--simclr_mlp", "64", "16", "64",
              "--warmup", "0", "--runs", "1", "--adam", "fused")
    assert "irra: losses sdm+mlm+id" in out and "optimizer Adam\n" in out
    assert "tbps: losses nitc+mvs+ss+citc+ritc" in out and "optimizer AdamW" in out
    medians = {m: float(out.split(f"{m:6}: median")[1].split()[0]) for m in ("irra", "tbps")}
    ratio = float(out.split("step time tbps/irra (fused):")[1].split("x")[0])
    assert abs(ratio - medians["tbps"] / medians["irra"]) < 0.01 * ratio + 0.006


def test_bench_eval_small():
    out = run("-m", "benchmarks.bench_eval", "--small")
    assert "speed-up vs naive" in out and "ours vs naive" in out


def test_bench_train_variants_small(tmp_path):
    """original / ours / ours + --grad_checkpointing, each in its own process, at tiny size."""
    out_json = str(tmp_path / "variants.json")
    out = run("-m", "benchmarks.bench_train_variants", "--arch", "scratch:ViT-Micro", "--batch_size", "4", "--img_size",
              "64", "32", "--cmt_depth", "1", "--warmup", "1", "--runs", "1", "--device", "cpu", "--precision", "fp32",
              "--json", out_json, "--peak_tflops", "1", "--profile", "2")
    assert "ours vs original:" in out and "grad checkpointing vs ours: peak memory" in out
    assert "ours: fused_attention True, length_bucket 1" in out and "profile of one step" in out
    assert "ours: " in out and "MFU" in out and "device busy" not in out  # no accelerator: no device time
    with open(out_json) as f:
        res = json.load(f)["results"]
    assert list(res) == ["original", "ours", "ours_ckpt"]
    # same weights and batch in the three processes: the same first-step loss (ckpt is exact, fast up to rounding)
    assert res["ours_ckpt"]["first_loss"] == res["ours"]["first_loss"]
    assert abs(res["ours"]["first_loss"] - res["original"]["first_loss"]) < 1e-4
    # the fast path skips the MLM head at unmasked positions; checkpointing recomputes the blocks' forward
    assert res["original"]["flops_per_sample"] > res["ours"]["flops_per_sample"]
    assert res["ours_ckpt"]["flops_per_sample"] > res["ours"]["flops_per_sample"]
    # ... and so moves fewer bytes; the recomputation moves more
    assert res["original"]["bytes_per_sample"] > res["ours"]["bytes_per_sample"]
    assert res["ours_ckpt"]["bytes_per_sample"] > res["ours"]["bytes_per_sample"]
    for r in res.values():
        assert r["device"] == "cpu" and r["mem_peak"] >= r["mem_after_build"] > 0 and len(r["step_s"]) == 1


def test_bench_encode_small():
    out = run("-m", "benchmarks.bench_encode", "--arch", "scratch:ViT-Micro", "--img_size", "64", "32", "--images",
              "8", "--texts", "16", "--batch_size", "8", "--runs", "1")
    assert "ours vs original: images" in out
    diff = float(out.split("over the first batch's features:")[1].split()[0])
    assert diff < 1e-4  # the cut and the fused attention keep the features


def test_traffic_counter_counts_operator_inputs_and_outputs():
    """TrafficCounter: every non-view operator reads its tensor inputs and writes its outputs; views move nothing;
    the backward's operators count too."""
    import torch

    from benchmarks.bench_train_variants import TrafficCounter

    a, b = torch.randn(4, 5), torch.randn(5, 3, dtype=torch.float64)
    with TrafficCounter() as t:
        a.view(20).view(5, 4).t()
    assert t.total == 0  # views move nothing
    with TrafficCounter() as t:
        a.t().reshape(20)  # the transposed view is not contiguous: reshape copies it (80 bytes read, 80 written)
    assert t.total == 80 + 80
    with TrafficCounter() as t:
        a.add_(1.0)  # in place: read and written
    assert t.total == 80 + 80
    with TrafficCounter() as t:
        torch.mm(a.double(), b)  # _to_copy: 80 read + 160 written; mm: 160 + 120 read, 96 written
    assert t.total == (80 + 160) + (160 + 120 + 96)
    w = torch.randn(3, requires_grad=True)
    with TrafficCounter() as t:
        (w * 2).sum().backward()
    assert t.total > 0 and w.grad is not None


def test_bench_search_page_small():
    out = run("-m", "benchmarks.bench_search_page", "--arch", "scratch:ViT-Micro", "--gallery_size", "300",
              "--queries", "3", "--topk", "5")
    assert "HTTP round trip (what the page waits for): median" in out and "target: under 200 ms" in out


def test_bench_search_page_int8_index_prints_recall():
    out = run("-m", "benchmarks.bench_search_page", "--arch", "scratch:ViT-Micro", "--gallery_size", "2000",
              "--queries", "3", "--topk", "5", "--index_threshold", "1000")
    assert "ranking alone (int8 index)" in out and "100 candidates re-scored exactly" in out
    recall = float(out.split("recall@5 against exact search over the 3 timed queries:")[1].split()[0])
    assert recall == 1.0  # the top-5 of 2,000 lies far inside 100 candidates: the int8 error is ~1e-3


def test_bench_search_starts_and_grow_small():
    out = run("-m", "benchmarks.bench_search_page", "--mode", "starts", "--arch", "scratch:ViT-Micro", "--images",
              "12", "--captions", "20")
    assert "first start (no cache):" in out and "encoding 12 images" in out and "20 captions" in out
    assert "second start (cached):" in out and "encoding 0 images 0.0 s + 0 captions" in out
    r1 = [line.split("(R1 ")[1] for line in out.splitlines() if "(R1 " in line]
    assert len(r1) == 2 and r1[0] == r1[1]  # the cached start ranks the same
    out = run("-m", "benchmarks.bench_search_page", "--mode", "starts", "--arch", "scratch:ViT-Micro", "--images",
              "12", "--captions", "20", "--sample", "3")
    assert "encoding rate measured on 3 images and 6 captions" in out and "first start (no cache), estimated" in out
    assert "second start (cached):" in out and "encoding 0 images 0.0 s + 0 captions" in out
    out = run("-m", "benchmarks.bench_search_page", "--mode", "grow", "--arch", "scratch:ViT-Micro", "--gallery_size",
              "40", "--added", "3")
    assert "start with nothing new:" in out and "(0 images encoded, 40 in the gallery)" in out
    assert "start with 3 photos added:" in out and "encoding 3 images" in out and "(43 in the gallery)" in out
