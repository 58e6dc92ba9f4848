"""Issue 25 §3-§4: RDE's surfaces under faults, on the tiny dataset.

- a run is a function of its options and seed: two runs with the same options give the same weights and ccd.jsonl;
  stopped after epoch 1 and resumed, or stopped by SIGTERM inside the CCD pass and resumed with the printed command,
  it equals the uninterrupted run;
- CCD's loss pass visits the pairs in an order drawn from (seed, epoch) only: ``ccd_order`` itself, the per-sample
  losses under any state of torch's global generator, and two (simulated) ranks seeded as ``do_train`` seeds them;
- a pickled ``--noisy_file`` is refused, naming the file, and nothing in it runs;
- a ``--noisy_file`` that contradicts ``--noisy_rate`` is warned about, naming both rates, and the measured rate is
  recorded in configs.yaml and shown by ``tools.summarize``;
- ``python -m datasets.check`` (the report's old entry point) fails, naming ``tools.check_dataset``.

The planted bug of issue 25 §4 (``ccd_order`` drawing ``torch.randperm(n)`` from torch's global generator) is caught
by the three CCD-order tests, not by the whole-run ones: ``do_train`` reseeds the global generator at the start of
every epoch from (seed, epoch, rank), so in one process the bug still gives the same order in two runs and across a
resume. What it breaks is DDP, where each rank's generator is seeded differently: the ranks' batches then overlap and
miss pairs (the two-rank test), and anything that drew from the global generator before the pass would change it.
"""
import json
import logging
import os
import pickle
import re
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

import train
import utils.comm as comm
from datasets.bases import (NOISY_RATE_SLACK_ROWS, check_noisy_rate, draw_noisy_index, inject_noisy_correspondence,
                            measured_noisy_rate)
from methods.rde.ccd import STREAM_ORDER, ccd_order, ccd_seed, per_sample_losses
from processor.processor import EPOCH_SEED_STRIDE, RANK_SEED_STRIDE
from tests.ddp_step_worker import CCDDataset, build
from tests.test_rde_train import rde_argv, read_jsonl
from tests.test_signals import LINE
from tests.test_summarize import make_run
from tools import summarize
from utils.checkpoint import read_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = ("seconds", "seconds_losses")  # the ccd.jsonl fields that measure time, not the run
# 50 % noise, RDE's token augmentation, and CCD batches of 4 (8 batches of the 32 pairs: the order matters)
FAULT_OPTS = ("--noisy_rate", "0.5", "--txt_aug", "--ccd_batch_size", "4")


def fault_argv(root, logs, noise_file, *extra):
    return rde_argv(root, str(logs), *FAULT_OPTS, "--noisy_file", str(noise_file), *extra)


def run_record(run_dir):
    """What a run produced, timings aside: the weights of last.pth and best.pth, ccd.jsonl, metrics.jsonl."""
    weights = {name: torch.load(os.path.join(run_dir, name), weights_only=True)["model"]
               for name in ("last.pth", "best.pth")}
    ccd = [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_jsonl(os.path.join(run_dir, "ccd.jsonl"))]
    return {"weights": weights, "ccd": ccd, "metrics": read_jsonl(os.path.join(run_dir, "metrics.jsonl"))}


def assert_same_run(got, want):
    assert got["ccd"] == want["ccd"]
    assert got["metrics"] == want["metrics"]
    for name, sd in want["weights"].items():
        assert got["weights"][name].keys() == sd.keys()
        differ = [k for k, v in sd.items() if not torch.equal(got["weights"][name][k], v)]
        assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def noise_file(tmp_path_factory):
    """Where the reference run draws its noise index (the runs after it read it)."""
    return tmp_path_factory.mktemp("noise") / "noise.npy"


@pytest.fixture(scope="module")
def reference(tiny_cuhk_root, tmp_path_factory, noise_file):
    """An uninterrupted 2-epoch RDE run."""
    out = train.main(fault_argv(tiny_cuhk_root, tmp_path_factory.mktemp("ref"), noise_file))
    rec = run_record(out["run_dir"])
    assert [r["epoch"] for r in rec["ccd"]] == [1, 2] and all(r["total"] == 32 for r in rec["ccd"])
    return {"run_dir": out["run_dir"], **rec}


# ------------------------------------------------------------------------------------------- the run is repeatable
def test_same_options_and_seed_give_the_same_run(reference, tiny_cuhk_root, tmp_path, noise_file):
    out = train.main(fault_argv(tiny_cuhk_root, tmp_path, noise_file))
    assert_same_run(run_record(out["run_dir"]), reference)


def test_resume_after_epoch_1_equals_the_uninterrupted_run(reference, tiny_cuhk_root, tmp_path, noise_file):
    first = train.main(fault_argv(tiny_cuhk_root, tmp_path, noise_file, "--stop_epoch", "1"))
    run = first["run_dir"]
    assert [r["epoch"] for r in read_jsonl(os.path.join(run, "ccd.jsonl"))] == [1]
    resumed = train.main(fault_argv(tiny_cuhk_root, tmp_path, noise_file, "--resume", "--resume_ckpt_file",
                                    os.path.join(run, "last.pth")))
    assert resumed["run_dir"] == run
    assert_same_run(run_record(run), reference)


# In a subprocess: train.py, with SIGTERM sent to itself from inside CCD's loss pass of epoch 2 (before its 1st batch's
# forward), so the signal lands in the pass and not between epochs.
SIGTERM_IN_CCD = textwrap.dedent("""
    import os, runpy, signal, sys
    import methods.rde.ccd as ccd
    from methods.rde.model import RDE
    state = {"epoch": 0, "sent": False}
    losses_pass, forward = ccd.per_sample_losses, RDE.compute_per_loss
    def per_sample_losses(model, dataset, batch_size, seed, epoch, *a, **k):
        state["epoch"] = epoch
        return losses_pass(model, dataset, batch_size, seed, epoch, *a, **k)
    def compute_per_loss(self, batch):
        if state["epoch"] == 2 and not state["sent"]:
            state["sent"] = True
            print("test: SIGTERM inside the CCD pass of epoch 2", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, batch)
    ccd.per_sample_losses, RDE.compute_per_loss = per_sample_losses, compute_per_loss
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path("train.py", run_name="__main__")
""")


def test_sigterm_in_the_ccd_pass_stops_with_one_line_and_resumes(reference, tiny_cuhk_root, tmp_path, noise_file):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("IRRA_DEBUG", None)
    logs = tmp_path / "logs"
    r = subprocess.run([sys.executable, "-c", SIGTERM_IN_CCD, *fault_argv(tiny_cuhk_root, logs, noise_file)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert "test: SIGTERM inside the CCD pass of epoch 2" in out, out[-3000:]
    assert r.returncode == 143, out[-3000:]
    assert "Traceback" not in out
    found = [LINE.search(ln) for ln in out.splitlines() if "interrupted by" in ln]
    assert len(found) == 1 and found[0], out[-3000:]
    m = found[0]
    assert m.group(1) == "SIGTERM" and m.group(6) == "1" and m.group(7) == "1"  # after epoch 1; last.pth holds 1
    (run,) = (logs / "CUHK-PEDES").iterdir()
    assert read_checkpoint(str(run / "last.pth"))["epoch"] == 1
    assert [c["epoch"] for c in read_jsonl(run / "ccd.jsonl")] == [1]  # the stopped pass wrote nothing
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]
    cmd = shlex.split(m.group(8))
    assert cmd[:2] == ["python", "train.py"]
    r = subprocess.run([sys.executable, *cmd[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "continuing at epoch 2" in r.stdout + r.stderr
    assert_same_run(run_record(str(run)), reference)


# --------------------------------------------------------------------------- CCD's order: from (seed, epoch) only
def test_ccd_order_is_a_function_of_seed_and_epoch_only():
    torch.manual_seed(0)
    a = ccd_order(50, 1, 3)
    assert sorted(a.tolist()) == list(range(50))  # a permutation
    assert a.tolist() != list(range(50))
    torch.manual_seed(12345)
    torch.rand(7)
    assert torch.equal(ccd_order(50, 1, 3), a)  # whatever the global generator's state
    state = torch.get_rng_state()
    ccd_order(50, 1, 3)
    assert torch.equal(torch.get_rng_state(), state)  # and it draws nothing from it
    # the documented draw: torch.randperm from a generator seeded with ccd_seed(seed, epoch, STREAM_ORDER)
    g = torch.Generator().manual_seed(ccd_seed(1, 3, STREAM_ORDER))
    assert torch.equal(a, torch.randperm(50, generator=g))
    assert not torch.equal(ccd_order(50, 1, 4), a)  # another epoch, another order
    assert not torch.equal(ccd_order(50, 2, 3), a)  # another seed, another order


@pytest.fixture(scope="module")
def tiny_rde():
    model, _ = build("tal", False, train=False)
    return model, CCDDataset()


def test_ccd_losses_do_not_depend_on_the_global_generator(tiny_rde):
    model, data = tiny_rde
    torch.manual_seed(0)
    want = per_sample_losses(model, data, batch_size=3, seed=1, epoch=2)
    torch.manual_seed(1)
    torch.rand(3)
    got = per_sample_losses(model, data, batch_size=3, seed=1, epoch=2)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # the order matters: another epoch's batches give other losses (so the check above can fail)
    other = per_sample_losses(model, data, batch_size=3, seed=1, epoch=3)
    assert not torch.equal(other[0], want[0])


def test_ccd_pass_over_two_ranks_seeded_as_training_covers_each_pair_once(tiny_rde, monkeypatch):
    """Rank r takes batches r, r + 2, ... of the one order. do_train seeds each rank's global generator differently
    (seed + epoch * EPOCH_SEED_STRIDE + rank * RANK_SEED_STRIDE): the ranks must still draw the same order."""
    model, data = tiny_rde
    seed, epoch, n = 1, 2, len(data)
    want = per_sample_losses(model, data, batch_size=3, seed=seed, epoch=epoch)
    parts = []

    def gather(local):  # keep this rank's part; give the other rank's pairs zeros so the pass completes
        parts.append(local)
        mine = set(local[0].tolist())
        rest = torch.tensor([i for i in range(n) if i not in mine], dtype=torch.long)
        return [local, (rest, torch.zeros(len(rest)), torch.zeros(len(rest)))]

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "all_gather", gather)
    for rank in (0, 1):
        monkeypatch.setattr(comm, "get_rank", lambda rank=rank: rank)
        torch.manual_seed(seed + epoch * EPOCH_SEED_STRIDE + rank * RANK_SEED_STRIDE)
        per_sample_losses(model, data, batch_size=3, seed=seed, epoch=epoch)
    idx = torch.cat([p[0] for p in parts])
    assert sorted(idx.tolist()) == list(range(n)), idx.tolist()  # every pair once, over both ranks
    for i, a, b in parts:
        assert torch.equal(a, want[0][i]) and torch.equal(b, want[1][i])  # the one-process batches


# ------------------------------------------------------------------------------------------- a pickled noise file
class _MakeDir:
    """Unpickling it runs os.mkdir(path): the marker of code run from a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _object_npy(path, marker):
    np.save(path, np.array([_MakeDir(marker)] * 32, dtype=object), allow_pickle=True)


def _raw_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump([_MakeDir(marker)], f)


@pytest.mark.parametrize("write", [_object_npy, _raw_pickle], ids=["object-npy", "raw-pickle"])
def test_pickled_noise_file_is_refused_and_nothing_in_it_runs(tiny_cuhk_root, tmp_path, write):
    live, marker = tmp_path / "ran_live", tmp_path / "ran"
    write(tmp_path / "live.npy", live)  # the payload is live: loading it with pickles allowed runs it
    if write is _object_npy:
        np.load(tmp_path / "live.npy", allow_pickle=True)
    else:
        with open(tmp_path / "live.npy", "rb") as f:
            pickle.load(f)
    assert live.is_dir()
    evil = tmp_path / "noise.npy"
    write(evil, marker)
    before = evil.read_bytes()
    logs = tmp_path / "logs"
    with pytest.raises(ValueError, match=re.escape(f"--noisy_file {evil}: not a readable .npy int array")):
        train.main(rde_argv(tiny_cuhk_root, str(logs), "--noisy_rate", "0.2", "--noisy_file", str(evil),
                            "--num_epoch", "1"))
    assert not marker.exists()  # nothing in the file was executed
    assert evil.read_bytes() == before  # the file is left as it was (not replaced by a drawn index)
    assert not (logs / "CUHK-PEDES").exists()  # the failed run's new directory is removed


# ---------------------------------------------------------------------- a noise file that contradicts --noisy_rate
def _moving(n, moved):
    """A noise index of ``n`` rows in which exactly the first ``moved`` rows (>= 2) get another row's caption."""
    index = np.arange(n)
    index[:moved] = np.roll(index[:moved], 1)
    return index


def _noise_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--noisy_file" in r.getMessage()]


def test_noise_file_contradicting_noisy_rate_is_warned_naming_both_rates(tmp_path, caplog):
    """The issue's case: a file that permutes 50 % of 1920 pairs given with --noisy_rate 0.2."""
    rows = [(i // 8, i, f"{i}.jpg", f"caption {i}") for i in range(1920)]
    path = tmp_path / "half.npy"
    np.save(path, draw_noisy_index(1920, 0.5, 0))
    with caplog.at_level(logging.WARNING, logger="IRRA.dataset"):
        _, real = inject_noisy_correspondence(rows, 0.2, str(path))
    measured = measured_noisy_rate(real)
    assert 0.49 < measured <= 0.5
    (msg,) = _noise_warnings(caplog)
    assert str(path) in msg and "--noisy_rate is 0.2" in msg and f"{measured:.4f}" in msg
    # the file still wins (RDE's behaviour): the pairs are those of the file
    assert int((real == 0).sum()) == int((np.load(path) != np.arange(1920)).sum())


def test_noise_files_at_their_rate_are_not_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="IRRA.dataset"):
        for n in (32, 1920, 68126):  # the tiny set, SynthPEDES's demo, CUHK-PEDES's training pairs
            for rate in (0.2, 0.5, 0.8):
                for seed in range(5):
                    index = draw_noisy_index(n, rate, seed)
                    assert check_noisy_rate(index, rate, "drawn.npy") == pytest.approx(
                        float((index != np.arange(n)).mean()))
        # the index RDE's own code drew (tests/fixtures/rde: 9 of 20 rows moved at 0.5)
        rde = json.load(open(os.path.join(REPO, "tests", "fixtures", "rde", "rde_functions.json")))["noise"]
        assert check_noisy_rate(np.array(rde["noisy_index"]), rde["noisy_rate"], "rde.npy") == 9 / 20
    assert _noise_warnings(caplog) == []
    # the bound: within NOISY_RATE_SLACK_ROWS rows of rate * N passes, one more row is warned about
    with caplog.at_level(logging.WARNING, logger="IRRA.dataset"):
        check_noisy_rate(_moving(1000, 200 + NOISY_RATE_SLACK_ROWS), 0.2, "edge.npy")
        check_noisy_rate(_moving(1000, 200 - NOISY_RATE_SLACK_ROWS), 0.2, "edge.npy")
        assert _noise_warnings(caplog) == []
        check_noisy_rate(_moving(1000, 200 + NOISY_RATE_SLACK_ROWS + 1), 0.2, "over.npy")
        check_noisy_rate(_moving(1000, 200 - NOISY_RATE_SLACK_ROWS - 1), 0.2, "under.npy")
    assert [m.split()[1] for m in _noise_warnings(caplog)] == ["over.npy", "under.npy"]


def test_run_records_the_measured_noise_rate(reference, noise_file):
    cfg = yaml.safe_load(open(os.path.join(reference["run_dir"], "configs.yaml")))
    assert cfg["noisy_rate"] == 0.5
    assert cfg["noisy_rate_measured"] == float((np.load(noise_file) != np.arange(32)).mean())


def test_contradicting_noise_file_in_a_run_warns_and_is_recorded(tiny_cuhk_root, tmp_path):
    path = tmp_path / "three_quarters.npy"
    np.save(path, _moving(32, 24))
    out = train.main(rde_argv(tiny_cuhk_root, str(tmp_path / "logs"), "--noisy_rate", "0.2", "--noisy_file",
                              str(path), "--num_epoch", "1"))
    run = out["run_dir"]
    log = open(os.path.join(run, "train_log.txt")).read()
    assert f"--noisy_file {path} permutes 0.7500 of the 32 training pairs, but --noisy_rate is 0.2" in log
    assert "noisy pairs 24" in log  # trained on the file's pairs
    cfg = yaml.safe_load(open(os.path.join(run, "configs.yaml")))
    assert cfg["noisy_rate"] == 0.2 and cfg["noisy_rate_measured"] == 0.75
    (row,) = summarize.main([run])["runs"]
    assert row["noisy_rate"] == 0.2 and row["noisy_rate_measured"] == 0.75
    assert "noisy_rate 0.2, measured 0.7500" in row["notes"]
    # a configs.yaml with the key starts a new run (the key is run state, not an option)
    from utils.options import get_args
    assert not hasattr(get_args(["--config", os.path.join(run, "configs.yaml")]), "noisy_rate_measured")


def test_summary_shows_the_measured_rate_and_groups_over_it(tmp_path, capsys):
    """Two seeds drawn at 0.5 measure a little differently: still one group; each row names both rates."""
    make_run(tmp_path, "a", seed=1, val_r1=[10.0], noisy_rate=0.5, noisy_rate_measured=0.4984)
    make_run(tmp_path, "b", seed=2, val_r1=[11.0], noisy_rate=0.5, noisy_rate_measured=0.4979)
    make_run(tmp_path, "c", seed=3, val_r1=[12.0], noisy_rate=0.5)  # before the rate was recorded
    make_run(tmp_path, "d", seed=4, val_r1=[13.0])  # no noise: no note
    s = summarize.main([str(tmp_path)])
    notes = {r["run"]: r["notes"] for r in s["runs"]}
    assert "noisy_rate 0.5, measured 0.4984" in notes["a"] and "noisy_rate 0.5, measured 0.4979" in notes["b"]
    assert "noisy_rate 0.5 (measured rate not recorded)" in notes["c"]
    assert not [n for n in notes["d"] if "noisy" in n]
    assert [len(g["runs"]) for g in s["groups"]] == [3, 1]
    assert "measured 0.4984" in capsys.readouterr().out


# ------------------------------------------------------------------------------ the old dataset report entry point
def test_old_dataset_check_entry_point_fails_naming_the_new_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "IRRA_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "datasets.check", "--dataset_name", "RSTPReid", "--root_dir",
                        str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "nothing was checked" in r.stderr
    assert f"python -m tools.check_dataset --dataset_name RSTPReid --root_dir {tmp_path}" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
