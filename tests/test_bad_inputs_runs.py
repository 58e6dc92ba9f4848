"""Nothing silently wrong, end to end on tiny CPU runs: train.main / test.py / visualize.py given bad inputs stop with
an error naming the input, and nothing already written (checkpoints, metrics.jsonl) is lost.

One run stopped after epoch 1 (``--stop_epoch 1``) is shared; tests that resume it work on a copy.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml

import train
import visualize
from datasets import check as dcheck
from datasets.build import build_dataset
from model.build import IRRA
from processor import processor as proc
from search.retrieval import Retriever
from tests.conftest import REPO, test_script, tiny_train_argv
from utils.run_lock import RunLock, RunLockedError


METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def base_run(tiny_cuhk_root, tmp_path_factory):
    """A tiny run planned for 2 epochs, stopped after epoch 1: best.pth / last.pth of epoch 1."""
    logs = tmp_path_factory.mktemp("logs")
    res = train.main(tiny_train_argv(tiny_cuhk_root, str(logs), "--num_epoch", "2", "--stop_epoch", "1"))
    assert res["best_epoch"] == 1 and [m["epoch"] for m in read_metrics(res["run_dir"])] == [1]
    return res["run_dir"]


def copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("test_*", "gallery_cache"))
    return str(dest)


def resume_argv(root, run_dir):
    return tiny_train_argv(root, os.path.dirname(os.path.dirname(run_dir)), "--num_epoch", "2", "--resume",
                           "--resume_ckpt_file", os.path.join(run_dir, "last.pth"))


def run_dirs(logs):
    d = os.path.join(logs, "CUHK-PEDES")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


# ------------------------------------------------------------------------------------------------ 1. NaN features
def test_nan_features_stop_the_run_and_keep_the_checkpoints(base_run, tiny_cuhk_root, tmp_path, monkeypatch):
    """Epoch 2 trains with a finite loss (training does not go through IRRA.encode_image) but its evaluation sees
    NaN image features: the run stops naming the split and the rows; best.pth / last.pth of epoch 1 stay."""
    run = copy_run(base_run, tmp_path / "logs" / "CUHK-PEDES" / "run")
    before = {n: sha256(os.path.join(run, n)) for n in ("best.pth", "last.pth", "metrics.jsonl")}
    best_before = torch.load(os.path.join(run, "best.pth"), weights_only=True)["model"]
    real = IRRA.encode_image
    monkeypatch.setattr(IRRA, "encode_image", lambda self, image: real(self, image) * float("nan"))
    n_test = len(build_dataset("CUHK-PEDES", root=tiny_cuhk_root, verbose=False).test["img_paths"])
    with pytest.raises(FloatingPointError, match=rf"^test split: image gallery features: {n_test} of {n_test} rows "
                                                 r"hold NaN/inf values"):
        train.main(resume_argv(tiny_cuhk_root, run))
    log = open(os.path.join(run, "train_log.txt")).read()
    assert "Epoch 2 done" in log and "loss: nan" not in log  # epoch 2 trained with a finite loss
    assert {n: sha256(os.path.join(run, n)) for n in before} == before
    best_after = torch.load(os.path.join(run, "best.pth"), weights_only=True)
    assert best_after["epoch"] == 1
    assert all(torch.equal(best_after["model"][k], v) for k, v in best_before.items())


def test_test_script_checks_it_can_record_before_evaluating(base_run, tmp_path, monkeypatch):
    """A test_metrics.json that cannot be kept stops test.py before any data is read or evaluated."""
    run = copy_run(base_run, tmp_path / "run")
    with open(os.path.join(run, "test_metrics.json"), "w") as f:
        f.write("{broken")
    monkeypatch.setattr(test_script, "build_dataloader", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(ValueError, match=r"test_metrics\.json: cannot read it .*left unchanged"):
        test_script.main(["--config_file", run, "--device", "cpu"])
    assert open(os.path.join(run, "test_metrics.json")).read() == "{broken"


# ------------------------------------------------------------------------------------------------ 8. resume metrics
def test_resume_does_not_list_an_epoch_twice(base_run, tiny_cuhk_root, tmp_path):
    """Killed after epoch 2's evaluation but before its last.pth, and during a second append (a cut last line): the
    resumed run evaluates epoch 2 again and metrics.jsonl lists it once (the new record); the cut line is dropped."""
    run = copy_run(base_run, tmp_path / "logs" / "CUHK-PEDES" / "run")
    first_line = open(os.path.join(run, "metrics.jsonl")).readline()
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": 2, **{k: -1.0 for k in METRIC_KEYS}}) + "\n")
        f.write('{"epoch": 2, "R1": 1')
    train.main(resume_argv(tiny_cuhk_root, run))
    lines = open(os.path.join(run, "metrics.jsonl")).readlines()
    assert lines[0] == first_line
    records = [json.loads(ln) for ln in lines]
    assert [r["epoch"] for r in records] == [1, 2]
    assert 0 <= records[1]["R1"] <= records[1]["R10"] <= 100  # the real evaluation, not the stale record
    assert torch.load(os.path.join(run, "last.pth"), weights_only=True)["epoch"] == 2


# ------------------------------------------------------------------------------------------------ 4. checkpoints
@pytest.fixture(scope="module")
def legacy_best(base_run, tmp_path_factory):
    """best.pth of the base run re-saved in torch's legacy (non-zip) format."""
    path = str(tmp_path_factory.mktemp("legacy") / "best_legacy.pth")
    torch.save(torch.load(os.path.join(base_run, "best.pth"), weights_only=True), path,
               _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    return path


def logged_epoch_1(run_dir):
    return next(m for m in read_metrics(run_dir) if m["epoch"] == 1)


def test_test_py_reads_a_legacy_checkpoint(base_run, legacy_best):
    metrics = test_script.main(["--config_file", os.path.join(base_run, "configs.yaml"), "--checkpoint", legacy_best,
                                "--device", "cpu"])
    logged = logged_epoch_1(base_run)
    for k in METRIC_KEYS:
        assert metrics[k] == pytest.approx(logged[k], abs=1e-4), k


def test_test_py_takes_the_run_directory(base_run):
    metrics = test_script.main(["--config_file", base_run, "--device", "cpu"])
    logged = logged_epoch_1(base_run)
    for k in METRIC_KEYS:
        assert metrics[k] == pytest.approx(logged[k], abs=1e-4), k


def test_visualize_reads_a_legacy_checkpoint(base_run, legacy_best, tmp_path):
    sentences = ["a man in a red shirt and blue jeans", "a woman with a black bag"]
    a = Retriever.from_run(base_run, checkpoint=legacy_best, device="cpu")
    b = Retriever.from_run(base_run, device="cpu")  # best.pth, torch's zip format
    assert torch.equal(a.encode_texts(sentences), b.encode_texts(sentences))
    saved = visualize.main(["--config_file", base_run, "--checkpoint", legacy_best, "--query", sentences[0],
                            "--topk", "3", "--out", str(tmp_path / "vis"), "--device", "cpu", "--num_workers", "0"])
    assert len(saved) == 1 and saved[0].is_file() and saved[0].parent == tmp_path / "vis"


@pytest.mark.parametrize("kind", ["truncated", "empty", "random bytes"])
def test_unreadable_checkpoint_is_named(base_run, tmp_path, kind):
    data = open(os.path.join(base_run, "best.pth"), "rb").read()
    bad = tmp_path / "bad.pth"
    bad.write_bytes({"truncated": data[:len(data) // 2], "empty": b"",
                     "random bytes": bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                         generator=torch.Generator().manual_seed(0)).tolist())}[kind])
    for load in (lambda: test_script.main(["--config_file", base_run, "--checkpoint", str(bad), "--device", "cpu"]),
                 lambda: Retriever.from_run(base_run, checkpoint=str(bad), device="cpu")):
        with pytest.raises(ValueError) as err:
            load()
        msg = str(err.value)
        assert msg.startswith(f"{bad}: ") and "not a readable torch checkpoint" in msg, msg
        assert "weights_only" not in msg
    assert not os.path.exists(tmp_path / "test_metrics.json")  # nothing recorded for a checkpoint never read


# ------------------------------------------------------------------------------------------------ 6. grid mismatch
@pytest.mark.parametrize("change, implied", [
    ({"img_size": [384, 128]}, "img_size 384x128 with stride_size 16 (patch 16) implies a 24x8 grid of 192"),
    ({"stride_size": 8}, "img_size 64x32 with stride_size 8 (patch 16) implies a 7x3 grid of 21"),
])
def test_config_that_does_not_fit_the_checkpoint(base_run, tmp_path, change, implied):
    ckpt = os.path.join(base_run, "best.pth")
    pos = torch.load(ckpt, weights_only=True)["model"]["base_model.visual.positional_embedding"]
    n_grid = pos.shape[0] - 1  # the class token is not a grid position
    cfg = yaml.safe_load(open(os.path.join(base_run, "configs.yaml")))
    assert tuple(cfg["img_size"]) == (64, 32) and cfg["stride_size"] == 16 and n_grid == 4 * 2
    cfg.update(change)
    cfg_file = tmp_path / "configs.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    for load in (lambda: test_script.main(["--config_file", str(cfg_file), "--checkpoint", ckpt, "--device", "cpu",
                                           "--root_dir", str(tmp_path / "no_data")]),  # fails before the data
                 lambda: Retriever.from_run(str(cfg_file), checkpoint=ckpt, device="cpu")):
        with pytest.raises(ValueError) as err:
            load()
        msg = str(err.value)
        assert msg.startswith(f"{cfg_file} does not fit {ckpt}: "), msg
        assert f"trained on a grid of {n_grid} patch positions" in msg and implied in msg
        assert "not a square grid" not in msg


# ------------------------------------------------------------------------------------------------ 3. image check
def test_corrupt_image_stops_training_before_the_first_epoch(base_run, tiny_cuhk_root, tmp_path, monkeypatch,
                                                             capsys):
    root = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_cuhk_root, "CUHK-PEDES"), root / "CUHK-PEDES")  # the cache comes along
    bad = build_dataset("CUHK-PEDES", root=str(root), verbose=False).test["img_paths"][1]
    with open(bad, "wb") as f:
        f.write(bytes(torch.randint(0, 256, (500,), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(1)).tolist()))
    epochs = []
    monkeypatch.setattr(proc, "train_one_epoch", lambda *a, **k: epochs.append(a) or pytest.fail("trained"))
    logs = str(tmp_path / "logs")
    with pytest.raises(dcheck.ImageCheckError) as err:
        train.main(tiny_train_argv(str(root), logs))
    msg = str(err.value)
    assert "1 of " in msg and f"{bad}: unreadable" in msg and "--skip_image_check" in msg
    assert epochs == [] and run_dirs(logs) == []  # the new run directory is removed
    assert "setup failed: removed the new run directory" in capsys.readouterr().out
    # test.py checks the test split of the data it is pointed at
    argv = ["--config_file", base_run, "--root_dir", str(root), "--device", "cpu"]
    with pytest.raises(dcheck.ImageCheckError, match=rf"{bad}: unreadable"):
        test_script.main(argv)
    # --skip_image_check (the option the message names) exists there too: the bad file is met while evaluating
    monkeypatch.setattr("utils.iotools.time.sleep", lambda s: None)
    with pytest.raises(OSError, match=rf"Could not read image '{bad}' after"):
        test_script.main(argv + ["--skip_image_check"])


# ------------------------------------------------------------------------------------------------ 8. leftovers
@pytest.mark.parametrize("extra, error, pattern", [
    (("--root_dir", "{tmp}/no_data"), FileNotFoundError, r"dataset folder '.*no_data/CUHK-PEDES' is not available"),
    (("--pretrain_choice", "{tmp}/no_such_clip.pt"), ValueError, r"pretrain_choice '.*no_such_clip\.pt': not an"),
])
def test_setup_failure_leaves_no_run_directory(tiny_cuhk_root, tmp_path, capsys, extra, error, pattern):
    logs = str(tmp_path / "logs")
    argv = tiny_train_argv(tiny_cuhk_root, logs, *(e.format(tmp=tmp_path) for e in extra))
    with pytest.raises(error, match=pattern):
        train.main(argv)
    assert not os.path.exists(logs)  # the run directory and the parents made for it (logs/CUHK-PEDES/, logs/)
    out = capsys.readouterr().out
    assert "setup failed: removed the new run directory" in out and "Using 1 process(es)" in out
    # folders that were there before are kept, with what they hold
    os.makedirs(os.path.join(logs, "CUHK-PEDES", "20200101_000000_old"))
    with pytest.raises(error, match=pattern):
        train.main(argv)
    assert run_dirs(logs) == ["20200101_000000_old"]
    os.rmdir(os.path.join(logs, "CUHK-PEDES", "20200101_000000_old"))
    with pytest.raises(error, match=pattern):
        train.main(argv)
    assert os.listdir(logs) == ["CUHK-PEDES"] and run_dirs(logs) == []  # it existed before this run: kept


def test_stop_epoch_zero_makes_no_run_directory(tiny_cuhk_root, tmp_path):
    logs = str(tmp_path / "logs")
    with pytest.raises(ValueError, match=r"--stop_epoch 0: expected >= 1"):
        train.main(tiny_train_argv(tiny_cuhk_root, logs, "--stop_epoch", "0"))
    assert not os.path.exists(logs)


# ------------------------------------------------------------------------------------------------ 9. file modes
def test_checkpoints_have_the_mode_of_the_run_files(base_run):
    want = os.stat(os.path.join(base_run, "configs.yaml")).st_mode & 0o777
    for name in ("best.pth", "last.pth", "metrics.jsonl"):
        assert os.stat(os.path.join(base_run, name)).st_mode & 0o777 == want, name


# ------------------------------------------------------------------------------------------- one writer per run
LOCK_HOLDER = """
import sys, time
from utils.run_lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_stops_at_once_and_a_killed_one_does_not_block(base_run, tiny_cuhk_root, tmp_path):
    """Two real processes: while one holds the run's lock, a resume in the same run stops before writing anything,
    naming the run and the holder's pid; once the holder is killed with SIGKILL, the resume runs."""
    run = copy_run(base_run, tmp_path / "logs" / "CUHK-PEDES" / "run")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, run], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {f: open(os.path.join(run, f), "rb").read() for f in ("metrics.jsonl", "train_log.txt", "last.pth")}
        with pytest.raises(RunLockedError, match=rf"{re.escape(run)} is in use: another process \(pid {holder.pid} "
                                                 rf"on .*\) trains in it"):
            train.main(resume_argv(tiny_cuhk_root, run))
        assert {f: open(os.path.join(run, f), "rb").read() for f in before} == before  # nothing written
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    res = train.main(resume_argv(tiny_cuhk_root, run))
    assert res["run_dir"] == run and [m["epoch"] for m in read_metrics(run)] == [1, 2]
    with RunLock(run):  # released when training ended: the same process can take it again
        pass
