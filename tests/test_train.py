"""The engine end to end on CPU: train.main(argv), the run directory, resume, test.py, torchrun, loud failures."""
import glob
import json
import os
import subprocess
import sys


import pytest
import torch

import train
from model import objectives
from tests.conftest import test_script, tiny_train_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def naive_metrics(run_dir, checkpoint):
    """R1/R5/R10/mAP/mINP of ``checkpoint`` on the run's evaluation split, computed here without the Evaluator:
    the model rebuilt from the checkpoint, the whole split encoded as one batch of captions and one of images, the
    full similarity matrix ranked by the original's ``rank`` (``rank_naive``)."""
    import torch.nn.functional as F

    from datasets.bases import ImageDataset, TextDataset
    from datasets.build import build_dataset, build_transforms
    from model.build import build_model
    from model.pretrained import clip_state_dict_from_checkpoint
    from utils.checkpoint import load_state_dict, read_model_state_dict
    from benchmarks.reference import rank_naive
    from utils.options import load_config_args

    args = load_config_args(run_dir, device="cpu")
    weights = read_model_state_dict(os.path.join(run_dir, checkpoint))
    model = build_model(args, weights["classifier.weight"].shape[0], device="cpu",
                        clip_state_dict=clip_state_dict_from_checkpoint(weights))
    load_state_dict(model, weights)
    model.eval()
    split = getattr(build_dataset(args.dataset_name, root=args.root_dir, verbose=False), args.val_dataset)
    images = ImageDataset(split["image_pids"], split["img_paths"], build_transforms(args.img_size, is_train=False))
    texts = TextDataset(split["caption_pids"], split["captions"], text_length=args.text_length)
    with torch.no_grad():
        t = F.normalize(model.encode_text(torch.stack([texts[i][1] for i in range(len(texts))])), dim=1)
        i = F.normalize(model.encode_image(torch.stack([images[j][1] for j in range(len(images))])), dim=1)
    cmc, mAP, mINP, _ = rank_naive(t @ i.t(), torch.tensor(split["caption_pids"]), torch.tensor(split["image_pids"]))
    # R@k with k beyond the gallery is R@(gallery size)
    return {**{f"R{k}": float(cmc[min(k, len(cmc)) - 1]) for k in (1, 5, 10)}, "mAP": float(mAP), "mINP": float(mINP)}


def assert_metrics_close(got, want):
    for k in ("R1", "R5", "R10", "mAP", "mINP"):
        assert got[k] == pytest.approx(want[k], abs=1e-3), (k, got, want)


@pytest.fixture(scope="module")
def two_epoch_run(tiny_cuhk_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    return train.main(tiny_train_argv(tiny_cuhk_root, str(logs), "--num_epoch", "3"))


def test_one_run_writes_every_file(two_epoch_run):
    run_dir = two_epoch_run["run_dir"]
    assert os.path.basename(os.path.dirname(run_dir)) == "CUHK-PEDES"
    assert os.path.basename(run_dir).endswith("_tiny")
    for name in ("configs.yaml", "train_log.txt", "metrics.jsonl", "best.pth", "last.pth"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents*"))
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert set(m) == {"epoch", "R1", "R5", "R10", "mAP", "mINP"}
    # the logged numbers are those of the saved weights, ranked independently
    assert_metrics_close(metrics[-1], naive_metrics(run_dir, "last.pth"))
    assert_metrics_close(next(m for m in metrics if m["epoch"] == two_epoch_run["best_epoch"]),
                         naive_metrics(run_dir, "best.pth"))
    best = max(metrics, key=lambda m: m["R1"])
    assert two_epoch_run["best_top1"] == pytest.approx(best["R1"])
    log = open(os.path.join(run_dir, "train_log.txt")).read()
    assert f"best R1: {two_epoch_run['best_top1']} at epoch {two_epoch_run['best_epoch']}" in log
    assert "samples/s" in log and "sdm_loss" in log and "mlm_acc" in log
    last = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert last["epoch"] == 3 and {"model", "optimizer", "scheduler", "best_top1"} <= set(last)
    best_ckpt = torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)
    assert best_ckpt["epoch"] == two_epoch_run["best_epoch"]


def test_run_dir_is_never_reused(two_epoch_run, tiny_cuhk_root):
    """A second run in the same second gets its own directory."""
    logs = os.path.dirname(os.path.dirname(two_epoch_run["run_dir"]))
    from processor.setup import make_run_dir
    from utils.options import get_args
    args = get_args(tiny_train_argv(tiny_cuhk_root, logs))
    a, b = make_run_dir(args), make_run_dir(args)
    assert a != b and os.path.isdir(a) and os.path.isdir(b)


def test_resume_equals_uninterrupted(two_epoch_run, tiny_cuhk_root, tmp_path):
    logs = str(tmp_path / "logs")
    first = train.main(tiny_train_argv(tiny_cuhk_root, logs, "--num_epoch", "3", "--stop_epoch", "2"))
    assert [m["epoch"] for m in read_metrics(first["run_dir"])] == [1, 2]
    ckpt = os.path.join(first["run_dir"], "last.pth")
    resumed = train.main(tiny_train_argv(tiny_cuhk_root, logs, "--num_epoch", "3", "--resume",
                                         "--resume_ckpt_file", ckpt))
    assert resumed["run_dir"] == first["run_dir"]
    assert read_metrics(resumed["run_dir"]) == read_metrics(two_epoch_run["run_dir"])
    a = torch.load(os.path.join(resumed["run_dir"], "last.pth"), weights_only=True)["model"]
    b = torch.load(os.path.join(two_epoch_run["run_dir"], "last.pth"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_test_script_reproduces_logged_metrics(two_epoch_run):
    run_dir = two_epoch_run["run_dir"]
    metrics = test_script.main(["--config_file", os.path.join(run_dir, "configs.yaml"), "--device", "cpu"])
    logged = next(m for m in read_metrics(run_dir) if m["epoch"] == two_epoch_run["best_epoch"])
    for k in ("R1", "R5", "R10", "mAP", "mINP"):
        assert metrics[k] == pytest.approx(logged[k], abs=1e-4), k
    assert os.path.isfile(os.path.join(run_dir, "test_log.txt"))


def test_test_script_errors(two_epoch_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        test_script.main(["--config_file", str(tmp_path / "configs.yaml")])
    cfg = tmp_path / "configs.yaml"
    cfg.write_text(open(os.path.join(two_epoch_run["run_dir"], "configs.yaml")).read())
    with pytest.raises(FileNotFoundError, match=r"best\.pth not found"):
        test_script.main(["--config_file", str(cfg), "--device", "cpu"])


def test_nonfinite_loss_stops_loudly_and_keeps_last_checkpoint(tiny_cuhk_root, tmp_path, monkeypatch):
    real_sdm, calls = objectives.compute_sdm, {"n": 0}

    def flaky_sdm(*a, **k):
        calls["n"] += 1
        loss = real_sdm(*a, **k)
        return loss * float("nan") if calls["n"] > calls.get("limit", 10 ** 9) else loss

    monkeypatch.setattr(objectives, "compute_sdm", flaky_sdm)
    from datasets.cuhkpedes import CUHKPEDES
    n_batches = -(-len(CUHKPEDES(root=tiny_cuhk_root, verbose=False).train) // 8)
    calls["limit"] = n_batches + 2  # compute_sdm runs once per iteration: NaN from iteration 3 of epoch 2
    with pytest.raises(FloatingPointError, match=r"epoch 2, iteration 3: total=nan .*sdm_loss=nan.*mlm_loss="):
        train.main(tiny_train_argv(tiny_cuhk_root, str(tmp_path / "logs")))
    (run_dir,) = glob.glob(str(tmp_path / "logs" / "CUHK-PEDES" / "*"))
    assert torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)["epoch"] == 1


def test_bad_inputs(tiny_cuhk_root, tmp_path, monkeypatch):
    logs = str(tmp_path / "logs")
    with pytest.raises(FileNotFoundError, match="--resume needs --resume_ckpt_file"):
        train.main(tiny_train_argv(tiny_cuhk_root, logs, "--resume"))
    with pytest.raises(ValueError, match="--dataset_name 'CUHK_PEDES': unknown; valid: .*'CUHK-PEDES'"):
        train.main(tiny_train_argv(tiny_cuhk_root, logs, "--dataset_name", "CUHK_PEDES"))
    with pytest.raises(ValueError, match="--optimizer 'Adamm': unknown; valid: \\['SGD', 'Adam', 'AdamW'\\]"):
        train.main(tiny_train_argv(tiny_cuhk_root, logs, "--optimizer", "Adamm"))
    with pytest.raises(ValueError, match="--test evaluates: use test.py"):
        train.main(tiny_train_argv(tiny_cuhk_root, logs, "--test"))
    assert not os.path.exists(logs)  # bad options are caught before a run directory is made
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)  # a CPU-only machine
    with pytest.raises(ValueError, match="--device xpu: no XPU device is available"):
        train.main(tiny_train_argv(tiny_cuhk_root, logs, "--device", "xpu"))


def test_torchrun_two_processes_gloo(tiny_cuhk_root, tmp_path):
    """``torchrun --nproc_per_node 2 train.py`` on CPU: one run dir, one metrics line per epoch, rank-0 files."""
    logs = str(tmp_path / "logs")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "train.py"),
           *tiny_train_argv(tiny_cuhk_root, logs, "--num_epoch", "1", "--sampler", "identity", "--num_instance", "2")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(logs, "CUHK-PEDES", "*"))
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1]
    assert os.path.isfile(os.path.join(run_dir, "last.pth"))
    assert "Using 2 process(es)" in open(os.path.join(run_dir, "train_log.txt")).read()


@pytest.mark.parametrize("precision", ["amp_bf16", "fp16"])
def test_other_precisions_train_on_cpu(tiny_cuhk_root, tmp_path, precision):
    """AMP autocast (bf16) and the original's fp16 weights (convert_weights) both train an epoch with finite losses."""
    # pure fp16 weights need the original's Adam (eps 1e-3): AdamW's eps 1e-8 underflows in fp16
    extra = ["--optimizer", "Adam", "--lr", "1e-4"] if precision == "fp16" else []
    res = train.main(tiny_train_argv(tiny_cuhk_root, str(tmp_path / "logs"), "--num_epoch", "1",
                                     "--precision", precision, *extra))
    (m,) = read_metrics(res["run_dir"])
    assert_metrics_close(m, naive_metrics(res["run_dir"], "last.pth"))  # evaluated in that precision
    sd = torch.load(os.path.join(res["run_dir"], "last.pth"), weights_only=True)["model"]
    want = torch.float16 if precision == "fp16" else torch.float32
    assert sd["base_model.visual.conv1.weight"].dtype == want
    assert sd["base_model.ln_final.weight"].dtype == torch.float32  # LayerNorm stays fp32


def test_test_script_needs_no_pretrained_clip_file(two_epoch_run, tmp_path):
    """A run named after OpenAI weights that are not on this machine still evaluates: the backbone's architecture
    and weights come from best.pth itself."""
    import shutil

    import yaml
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run["run_dir"], run)
    cfg = yaml.safe_load((run / "configs.yaml").read_text())
    cfg.update(pretrain_choice="ViT-B/16", clip_download_root=str(tmp_path / "empty_cache"))
    (run / "configs.yaml").write_text(yaml.safe_dump(cfg))
    metrics = test_script.main(["--config_file", str(run / "configs.yaml"), "--device", "cpu"])
    logged = next(m for m in read_metrics(str(run)) if m["epoch"] == two_epoch_run["best_epoch"])
    assert metrics["R1"] == pytest.approx(logged["R1"], abs=1e-4)
    assert not os.path.exists(tmp_path / "empty_cache")  # nothing was downloaded


def test_empty_validation_split_is_reported_before_training(tiny_cuhk_root, tmp_path):
    """--val_dataset val on a dataset without a val split fails at once, naming the option (not after an epoch)."""
    import json
    import shutil
    root = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_cuhk_root, "CUHK-PEDES"), root / "CUHK-PEDES")
    anno = root / "CUHK-PEDES" / "reid_raw.json"
    anno.write_text(json.dumps([a for a in json.loads(anno.read_text()) if a["split"] != "val"]))
    with pytest.raises(ValueError, match="--val_dataset val: CUHK-PEDES has no val split.*use --val_dataset test"):
        train.main(tiny_train_argv(str(root), str(tmp_path / "logs"), "--val_dataset", "val"))


def test_a_runs_configs_yaml_starts_a_new_run_with_its_options(two_epoch_run):
    """configs.yaml is enough to rebuild a run: given as --config it starts a new run beside the old one."""
    import yaml
    old = two_epoch_run["run_dir"]
    res = train.main(["--config", os.path.join(old, "configs.yaml"), "--num_epoch", "1"])
    assert os.path.dirname(res["run_dir"]) == os.path.dirname(old) and res["run_dir"] != old
    a = yaml.safe_load(open(os.path.join(old, "configs.yaml")))
    b = yaml.safe_load(open(os.path.join(res["run_dir"], "configs.yaml")))
    assert {k for k in a if a[k] != b.get(k)} == {"output_dir", "num_epoch", "config"}


def test_run_irra_sh(tiny_cuhk_root, tmp_path):
    """run_irra.sh: the demo path trains, then runs test.py on the new run (options shrunk for the test);
    an unknown dataset name is refused with the valid ones."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    bad = subprocess.run(["bash", os.path.join(REPO, "run_irra.sh"), "Foo"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "valid: demo CUHK-PEDES ICFG-PEDES RSTPReid" in bad.stderr
    small = tiny_train_argv(tiny_cuhk_root, str(tmp_path / "logs"), "--num_epoch", "1", "--val_dataset", "test",
                            "--cmt_depth", "1", "--precision", "fp32")
    proc = subprocess.run(["bash", os.path.join(REPO, "run_irra.sh"), "demo", *small], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run_dir,) = glob.glob(str(tmp_path / "logs" / "CUHK-PEDES" / "*"))
    assert f"Run directory: {run_dir}" in proc.stdout
    assert os.path.isfile(os.path.join(run_dir, "test_log.txt"))
    assert "Enter inferencing" in open(os.path.join(run_dir, "test_log.txt")).read()
    # best.pth and last.pth are tested, and the demo ends with the summary table of its run
    assert set(json.load(open(os.path.join(run_dir, "test_metrics.json")))) == {"best.pth", "last.pth"}
    assert "mean ± std (1 run)" in proc.stdout and proc.stdout.rstrip().endswith("+")
