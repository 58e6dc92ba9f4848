"""benchmarks/compare_runs.py: the DDP check of gpu_check.sh compares two runs' last.pth and metrics.jsonl."""
import json

import torch

from benchmarks.compare_runs import compare, main


def write_run(path, weights, metrics):
    path.mkdir()
    torch.save({"model": weights, "epoch": len(metrics)}, path / "last.pth")
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return str(path)


def weights():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "attn.in_proj_bias": torch.randn(12, generator=g),
            "step": torch.tensor(5)}


METRICS = [{"epoch": 1, "R1": 10.0, "loss": 2.5}, {"epoch": 2, "R1": 12.5, "loss": 2.0}]


def test_same_runs(tmp_path, capsys):
    a = write_run(tmp_path / "a", weights(), METRICS)
    b = write_run(tmp_path / "b", weights(), METRICS)
    assert main([a, b]) == 0
    assert "SAME" in capsys.readouterr().out


def test_weight_difference_found_and_named(tmp_path, capsys):
    w = weights()
    w["a.weight"][1, 2] += 3e-4
    a = write_run(tmp_path / "a", weights(), METRICS)
    b = write_run(tmp_path / "b", w, METRICS)
    r = compare(a, b)
    assert abs(r["weights"] - 3e-4) < 1e-6 and r["weights_tensor"] == "a.weight"
    assert main([a, b]) == 1
    assert "DIFFERENT" in capsys.readouterr().out
    assert main([a, b, "--atol", "1e-3"]) == 0


def test_key_bias_reported_apart(tmp_path):
    """Only the key third of in_proj_bias differs: reported, not counted against --atol."""
    w = weights()
    w["attn.in_proj_bias"][5] += 0.1  # [q 0:4 | k 4:8 | v 8:12]
    r = compare(write_run(tmp_path / "a", weights(), METRICS), write_run(tmp_path / "b", w, METRICS))
    assert r["weights"] == 0.0 and abs(r["key_biases"] - 0.1) < 1e-6
    w["attn.in_proj_bias"][9] += 0.1  # a value bias counts
    r = compare(str(tmp_path / "a"), write_run(tmp_path / "c", w, METRICS))
    assert abs(r["weights"] - 0.1) < 1e-6 and r["weights_tensor"] == "attn.in_proj_bias"


def test_metric_difference_and_mismatched_runs(tmp_path, capsys):
    a = write_run(tmp_path / "a", weights(), METRICS)
    b = write_run(tmp_path / "b", weights(), [METRICS[0], dict(METRICS[1], R1=13.0)])
    assert main([a, b]) == 1
    assert "epoch 2 R1: 12.5 vs 13" in capsys.readouterr().out
    c = write_run(tmp_path / "c", weights(), METRICS[:1])
    assert main([a, c]) == 2
    assert "other epochs" in capsys.readouterr().out
    w = weights()
    w["extra"] = torch.zeros(2)
    assert main([a, write_run(tmp_path / "d", w, METRICS)]) == 2
    assert main([a, str(tmp_path / "missing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().out
