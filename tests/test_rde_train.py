"""RDE training end to end on the tiny dataset: noise injection, CCD before every epoch (logged with the clean set's
precision / recall), training in train mode (or RDE's eval mode behind a flag), BGE / TSE / BGE+TSE evaluation, the
best checkpoint on BGE+TSE, test.py on the run; RDE's token augmentation."""
import json
import os
import random

import numpy as np
import pytest
import torch

import test as test_script
import train
from datasets.bases import token_augment
from tests.conftest import tiny_train_argv

RDE_OPTS = ("--loss_names", "tal", "--no-merge_param_groups", "--tse_embed_dim", "32", "--select_ratio", "0.5")


def rde_argv(root, logs, *extra):
    argv = tiny_train_argv(root, logs, *extra)
    i = argv.index("--MLM")
    argv = argv[:i] + argv[i + 1:]  # RDE takes no MLM
    j = argv.index("--loss_names")
    del argv[j:j + 2]
    return argv + list(RDE_OPTS)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def rde_run(tiny_cuhk_root, tmp_path_factory):
    logs = str(tmp_path_factory.mktemp("rde_logs"))
    noise = os.path.join(logs, "noise.npy")
    out = train.main(rde_argv(tiny_cuhk_root, logs, "--noisy_rate", "0.5", "--noisy_file", noise, "--txt_aug",
                              "--gmm_setting", "precise"))
    return out, noise


def test_rde_training_run(rde_run):
    out, noise = rde_run
    run = out["run_dir"]
    idx = np.load(noise)
    assert idx.shape == (32,) and (idx != np.arange(32)).sum() >= 12  # 16 of 32 pairs permuted (a few may stay)
    ccd = read_jsonl(os.path.join(run, "ccd.jsonl"))
    assert [c["epoch"] for c in ccd] == [1, 2]
    for c in ccd:
        assert c["total"] == 32 and 0 <= c["clean"] <= 32
        assert 0 <= c["clean_precision"] <= 1 and 0 <= c["clean_recall"] <= 1 and c["seconds"] > 0
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    for m in metrics:
        assert {"R1", "bge_R1", "tse_R1", "bge_mAP", "tse_mAP"} <= set(m)
    best = max(metrics, key=lambda m: m["R1"])  # best.pth chosen on BGE+TSE
    ckpt = torch.load(os.path.join(run, "best.pth"), weights_only=True)
    assert ckpt["epoch"] == best["epoch"]
    assert any(k.startswith("visul_emb_layer.") for k in ckpt["model"])
    last = torch.load(os.path.join(run, "last.pth"), weights_only=True)["model"]
    # train mode: the TSE BatchNorm running statistics moved
    assert last["visul_emb_layer.mlp.bns.0.running_mean"].abs().sum() > 0
    res = test_script.main(["--config_file", run, "--checkpoint", os.path.join(run, "best.pth")])
    assert {"R1", "bge_R1", "tse_R1"} <= set(res)


def test_eval_mode_flag_freezes_batchnorm(tiny_cuhk_root, tmp_path):
    out = train.main(rde_argv(tiny_cuhk_root, str(tmp_path), "--num_epoch", "1", "--rde_train_eval_mode"))
    last = torch.load(os.path.join(out["run_dir"], "last.pth"), weights_only=True)["model"]
    assert last["visul_emb_layer.mlp.bns.0.running_mean"].abs().sum() == 0  # RDE's trap: statistics never updated
    assert int(last["texual_emb_layer.mlp.bns.0.num_batches_tracked"]) == 0


def test_token_augment():
    mask = 49405
    tokens = torch.zeros(77, dtype=torch.long)
    words = list(range(100, 160))
    tokens[:62] = torch.tensor([49406] + words + [49407])
    out = token_augment(tokens, random.Random(0), mask)
    assert torch.equal(out, token_augment(tokens, random.Random(0), mask))  # a function of the generator
    assert out[0] == 49406 and (out == 49407).sum() == 1  # SOT / EOT kept
    n = int((out != 0).sum())
    eot = int(out.argmax())
    assert out[n:].eq(0).all() and eot == n - 1  # deletions shift left, zeros fill the end
    counts = {"mask": 0, "kept": 0, "other": 0, "deleted": 62 - n}
    for t in out[1:eot].tolist():
        counts["mask" if t == mask else "kept" if t in words else "other"] += 1
    assert counts["kept"] > 30 and counts["mask"] >= 1  # p 0.2 per token: most are kept
    # over many draws: hit rate 0.2, of which 60 % masked, 20 % deleted
    rng = random.Random(1)
    masked = deleted = 0
    for _ in range(200):
        o = token_augment(tokens, rng, mask)
        masked += int((o == mask).sum())
        deleted += 62 - int((o != 0).sum())
    assert abs(masked / (200 * 60) - 0.12) < 0.02 and abs(deleted / (200 * 60) - 0.04) < 0.015


def test_test_py_on_rde_released_format(tiny_cuhk_root, tmp_path):
    """A checkpoint in RDE's released layout ({"model": base_model.* / visul_emb_layer.* / texual_emb_layer.*, "epoch",
    "iteration", "num_epoch"}) with a configs.yaml as RDE's train.py writes it (its option names, loss_names with
    run_rde.sh's run-name suffix): test.py evaluates it with (S_bge + S_tse) / 2."""
    import yaml

    from model.build import build_model
    from utils.options import default_args
    torch.manual_seed(0)
    model = build_model(default_args(loss_names="tal", pretrain_choice="scratch:ViT-Micro", img_size=(64, 32),
                                     tse_embed_dim=32), 8)
    run = tmp_path / "rde_run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "epoch": 37, "iteration": 0, "num_epoch": 60}, run / "best.pth")
    cfg = {"name": "RDE", "dataset_name": "CUHK-PEDES", "root_dir": tiny_cuhk_root, "output_dir": str(run),
           "loss_names": "TAL+sr0.3_tau0.015_margin0.1_n0.5", "noisy_rate": 0.5,
           "noisy_file": "./noiseindex/CUHK-PEDES_0.5.npy", "tau": 0.015, "margin": 0.1, "select_ratio": 0.3,
           "img_aug": True, "txt_aug": True, "pretrain_choice": "ViT-B/16", "img_size": [64, 32], "stride_size": 16,
           "temperature": 0.02, "batch_size": 64, "test_batch_size": 16, "num_workers": 0, "training": True,
           "distributed": False, "text_length": 77}  # no tse_embed_dim: read from the weights (32 here)
    with open(run / "configs.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    res = test_script.main(["--config_file", str(run), "--device", "cpu"])
    assert {"R1", "bge_R1", "tse_R1"} <= set(res)
    saved = json.load(open(run / "test_metrics.json"))
    assert "best.pth" in json.dumps(saved)
