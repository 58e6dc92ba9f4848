"""Reporting over seeds: test.py's test_metrics.json, tools/summarize.py's table, run_irra.sh's SEEDS loop."""
import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
import yaml

import train
from tests.conftest import test_script, tiny_train_argv
from tools import summarize
from tools.summarize import main
from utils.run_dir import TEST_METRICS_FILE, write_test_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
BASE_CONFIG = {"dataset_name": "CUHK-PEDES", "val_dataset": "val", "lr": 1e-5, "batch_size": 64,
               "loss_names": "sdm+mlm+id", "img_size": [384, 128], "num_epoch": 4}


def metrics_of(r1):
    """A test record with distinct, known numbers derived from R1."""
    return {"R1": r1, "R5": r1 + 10.5, "R10": r1 + 15.25, "mAP": r1 - 3.125, "mINP": r1 - 9.75}


def make_run(parent, name, seed=None, config=None, val_r1=None, tested=None, **cfg):
    """A fake run directory: configs.yaml (BASE_CONFIG + cfg + seed/name/output_dir), metrics.jsonl (one line per
    val R1), test_metrics.json ({checkpoint name: (epoch, R1)})."""
    run = os.path.join(str(parent), name)
    os.makedirs(run)
    if config is not False:
        c = dict(BASE_CONFIG, **cfg, name=name, output_dir=run, **({} if seed is None else {"seed": seed}))
        with open(os.path.join(run, "configs.yaml"), "w") as f:
            yaml.safe_dump(c, f)
    if val_r1 is not None:
        with open(os.path.join(run, "metrics.jsonl"), "w") as f:
            for epoch, r1 in enumerate(val_r1, 1):
                f.write(json.dumps({"epoch": epoch, **metrics_of(r1)}) + "\n")
    if tested is not None:
        table = {ck: {"checkpoint": os.path.join(run, ck), "epoch": ep, "split": "test", **metrics_of(r1)}
                 for ck, (ep, r1) in tested.items()}
        with open(os.path.join(run, TEST_METRICS_FILE), "w") as f:
            json.dump(table, f)
    return run


def fmt(values):
    if len(values) == 1:
        return f"{values[0]:.2f} ± -"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table_line(out, run_name):
    (line,) = [ln for ln in out.splitlines() if f" {run_name} " in ln]
    return [c.strip() for c in line.strip("|").split("|")]


def test_rows_and_mean_std_over_seeds(tmp_path, capsys):
    runs = tmp_path / "CUHK-PEDES"
    # val R1 per epoch: the first maximum wins (epoch 2 in the first run, not epoch 3)
    specs = {"a_s1": (1, [10.0, 30.0, 30.0, 20.0], 41.5, 40.0),
             "b_s2": (2, [12.0, 18.0, 33.0, 31.0], 44.25, 43.0),
             "c_s3": (3, [40.0, 20.0, 20.0, 20.0], 39.0, 42.5)}
    best_epochs = {"a_s1": 2, "b_s2": 3, "c_s3": 1}
    for name, (seed, val, best_r1, last_r1) in specs.items():
        make_run(runs, name, seed=seed, val_r1=val,
                 tested={"best.pth": (best_epochs[name], best_r1), "last.pth": (4, last_r1)},
                 resume=seed == 2)  # a run-state key differing does not split the group
    summary = main([str(runs)])  # a folder of runs
    out = capsys.readouterr().out

    rows = summary["runs"]
    assert [r["run"] for r in rows] == ["a_s1", "b_s2", "c_s3"]
    assert [r["seed"] for r in rows] == [1, 2, 3]
    assert [r["best_epoch"] for r in rows] == [2, 3, 1]
    assert [r["last_epoch"] for r in rows] == [4, 4, 4]
    for r in rows:
        _, _, best_r1, last_r1 = specs[r["run"]]
        for m in METRICS:
            assert r[f"best_{m}"] == pytest.approx(metrics_of(best_r1)[m])
            assert r[f"last_{m}"] == pytest.approx(metrics_of(last_r1)[m])
        assert r["notes"] == []
        cells = table_line(out, r["run"])
        assert cells[:4] == [r["run"], str(r["seed"]), str(best_epochs[r["run"]]), f"{best_r1:.2f}"]
        assert cells[8] == "4" and cells[9] == f"{last_r1:.2f}"

    (group,) = summary["groups"]
    assert group["runs"] == [0, 1, 2] and group["seeds"] == [1, 2, 3]
    for m in METRICS:
        best = [metrics_of(s[2])[m] for s in specs.values()]
        last = [metrics_of(s[3])[m] for s in specs.values()]
        assert group["mean"][f"best_{m}"] == pytest.approx(statistics.mean(best))
        assert group["std"][f"best_{m}"] == pytest.approx(statistics.stdev(best))
        assert group["mean"][f"last_{m}"] == pytest.approx(statistics.mean(last))
        assert group["std"][f"last_{m}"] == pytest.approx(statistics.stdev(last))
    cells = table_line(out, "mean ± std (3 runs)")
    assert cells[1] == "1 2 3"
    assert cells[3:8] == [fmt([metrics_of(s[2])[m] for s in specs.values()]) for m in METRICS]
    assert cells[9:14] == [fmt([metrics_of(s[3])[m] for s in specs.values()]) for m in METRICS]
    assert cells[2] == f"{statistics.mean([2, 3, 1]):.1f} ± {statistics.stdev([2, 3, 1]):.1f}"
    assert group["notes"] == []

    # the same runs named one by one give the same rows
    assert [r["run"] for r in main([os.path.join(runs, n) for n in ("c_s3", "a_s1")])["runs"]] == ["c_s3", "a_s1"]


def test_groups_split_when_an_option_differs(tmp_path, capsys):
    make_run(tmp_path, "r1", seed=1, val_r1=[5.0, 7.0], tested={"best.pth": (2, 20.0), "last.pth": (2, 20.0)})
    make_run(tmp_path, "r2", seed=1, lr=3e-5, val_dataset="test", val_r1=[9.0, 8.0],
             tested={"best.pth": (1, 30.0), "last.pth": (2, 28.0)})
    make_run(tmp_path, "r3", seed=2, val_r1=[6.0, 4.0], tested={"best.pth": (1, 24.0), "last.pth": (2, 21.0)})
    summary = main([str(tmp_path / "r1"), str(tmp_path / "r2"), str(tmp_path / "r3")])
    out = capsys.readouterr().out
    groups = summary["groups"]
    assert [g["runs"] for g in groups] == [[0, 2], [1]]
    assert [g["options"] for g in groups] == [{"lr": 1e-5, "val_dataset": "val"},
                                              {"lr": 3e-5, "val_dataset": "test"}]
    # the group whose best epochs were chosen on the test split says so
    assert groups[0]["notes"] == [] and groups[1]["notes"] == ["@best chosen on the test split (val_dataset: test)"]
    assert groups[0]["mean"]["best_R1"] == pytest.approx(statistics.mean([20.0, 24.0]))
    assert groups[0]["std"]["best_R1"] == pytest.approx(statistics.stdev([20.0, 24.0]))
    assert groups[1]["mean"]["best_R1"] == pytest.approx(30.0) and groups[1]["std"]["best_R1"] is None
    two = table_line(out, "mean ± std (2 runs)")
    one = table_line(out, "mean ± std (1 run)")
    assert two[3] == fmt([20.0, 24.0]) and "lr=1e-05" in two[-1]
    assert one[3] == "30.00 ± -" and one[9] == "28.00 ± -" and "lr=3e-05" in one[-1]
    assert "chosen on the test split" in one[-1] and "chosen on the test split" not in two[-1]
    # rows come group by group: r1, r3, their mean, then r2, its mean
    names = ("r1", "r2", "r3", "mean")
    order = [next(n for n in names if f" {n} " in ln) for ln in out.splitlines()
             if ln.startswith("|") and any(f" {n} " in ln for n in names)]
    assert order == ["r1", "r3", "mean", "r2", "mean"]


def test_missing_and_bad_files_are_notes(tmp_path, capsys):
    make_run(tmp_path, "only_config", seed=1)
    make_run(tmp_path, "untested", seed=2, val_r1=[3.0, 5.0])
    make_run(tmp_path, "best_only", seed=3, val_r1=[3.0, 5.0], tested={"best.pth": (1, 11.0)})
    make_run(tmp_path, "no_config", config=False, val_r1=[1.0], tested={"best.pth": (1, 9.0), "last.pth": (1, 9.0)})
    bad = make_run(tmp_path, "bad_files", seed=4, val_r1=[2.0, 6.0])
    with open(os.path.join(bad, "metrics.jsonl"), "a") as f:
        f.write("{not json\n")
    with open(os.path.join(bad, TEST_METRICS_FILE), "w") as f:
        f.write("[1, 2]")
    summary = main([str(tmp_path)])
    out = capsys.readouterr().out
    rows = {r["run"]: r for r in summary["runs"]}
    notes = {name: "; ".join(r["notes"]) for name, r in rows.items()}
    assert "no metrics.jsonl" in notes["only_config"] and "no test_metrics.json" in notes["only_config"]
    assert rows["only_config"]["best_epoch"] is None and rows["only_config"]["best_R1"] is None
    assert "no test_metrics.json" in notes["untested"] and rows["untested"]["best_epoch"] == 2
    assert rows["untested"]["last_epoch"] == 2 and rows["untested"]["last_R1"] is None
    # best.pth tested at epoch 1 while metrics.jsonl's best is epoch 2: a stale result is pointed out
    assert "last.pth not tested" in notes["best_only"] and "best.pth tested at epoch 1" in notes["best_only"]
    assert rows["best_only"]["best_R1"] == pytest.approx(11.0)
    assert "no configs.yaml" in notes["no_config"] and rows["no_config"]["seed"] is None
    assert "metrics.jsonl line(s) 3 skipped" in notes["bad_files"]
    assert "expected a mapping of checkpoint file name to metrics, got list" in notes["bad_files"] and rows["bad_files"]["best_epoch"] == 2
    for name, note in notes.items():
        assert note and note in table_line(out, name)[-1], name
    # four configured runs differing only in seed form one group; the one without configs.yaml is alone
    groups = summary["groups"]
    names = [r["run"] for r in summary["runs"]]
    assert sorted(len(g["runs"]) for g in groups) == [1, 4]
    (alone,) = [g for g in groups if len(g["runs"]) == 1]
    assert names[alone["runs"][0]] == "no_config"
    (big,) = [g for g in groups if len(g["runs"]) == 4]
    assert "best.pth tested in 1 of 4 runs" in big["notes"] and "last.pth tested in 0 of 4 runs" in big["notes"]
    assert big["mean"]["best_R1"] == pytest.approx(11.0) and big["std"]["best_R1"] is None
    assert big["mean"]["last_R1"] is None


def test_one_bad_run_does_not_stop_the_summary(tmp_path, caplog):
    """A bad byte in one run's metrics.jsonl is a note in its row; a run that cannot be read at all is skipped with
    a warning; the other runs are summarised."""
    good = make_run(tmp_path, "good", seed=1, val_r1=[10.0, 20.0], tested={"best.pth": (2, 30.0)})
    bad = make_run(tmp_path, "bad", seed=2, val_r1=[10.0, 20.0])
    with open(os.path.join(bad, "metrics.jsonl"), "ab") as f:
        f.write(b'{"epoch": 3, "R1": 4\xff}\n{"epoch": 4, "R1": 50.0}\n')
    worse = make_run(tmp_path, "worse", seed=3, val_r1=[1.0])
    real = summarize.read_run
    monkey = {"worse": RuntimeError("disk gone")}

    def read_run(run_dir):
        if os.path.basename(run_dir) in monkey:
            raise monkey[os.path.basename(run_dir)]
        return real(run_dir)

    summarize.read_run = read_run
    try:
        with caplog.at_level("WARNING", logger="IRRA.summarize"):
            rows = {r["run"]: r for r in summarize.summarize_runs([str(tmp_path)])["runs"]}
    finally:
        summarize.read_run = real
    assert set(rows) == {"good", "bad"} and rows["good"]["best_R1"] == 30.0
    assert "metrics.jsonl line(s) 3 skipped" in "; ".join(rows["bad"]["notes"]) and rows["bad"]["best_epoch"] == 4
    assert f"{worse}: skipped, cannot be read (RuntimeError: disk gone)" in caplog.text
    assert good


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        main([str(tmp_path / "nope")])
    os.makedirs(tmp_path / "empty" / "sub")
    with pytest.raises(FileNotFoundError, match="neither a run directory nor a folder of runs"):
        main([str(tmp_path / "empty")])
    proc = subprocess.run([sys.executable, "-m", "tools.summarize", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no such directory" in proc.stderr


def test_write_test_metrics_keeps_other_checkpoints(tmp_path):
    best, last = str(tmp_path / "best.pth"), str(tmp_path / "last.pth")
    path = write_test_metrics(best, metrics_of(10.0), epoch=3)
    write_test_metrics(last, metrics_of(12.0), epoch=None)
    write_test_metrics(best, metrics_of(11.0), epoch=4)  # replaces best.pth's entry only
    assert path == str(tmp_path / TEST_METRICS_FILE)
    table = json.load(open(path))
    assert table == {"best.pth": {"checkpoint": best, "epoch": 4, "split": "test", **metrics_of(11.0)},
                     "last.pth": {"checkpoint": last, "epoch": None, "split": "test", **metrics_of(12.0)}}
    assert sorted(os.listdir(tmp_path)) == [TEST_METRICS_FILE]  # no temporary file left
    with open(path, "w") as f:
        f.write("{broken")
    with pytest.raises(ValueError, match="test_metrics.json: cannot read it .*left unchanged"):
        write_test_metrics(best, metrics_of(1.0), epoch=1)
    assert open(path).read() == "{broken"


def test_only_seed_name_output_dir_and_run_state_keys_leave_runs_in_one_group():
    """Two runs whose configs.yaml differ in one option are one experiment (one group) exactly when that option is
    the seed, the name, the output directory or a run-state key (utils.options.RUN_STATE_KEYS: resume, ...)."""
    from utils.options import RUN_STATE_KEYS, build_parser
    config = {a.dest: a.default for a in build_parser()._actions if a.dest != "help"}
    config["distributed"] = False  # saved by train.py, not an option
    same_experiment = {"seed", "name", "output_dir", *RUN_STATE_KEYS}
    for key in config:
        rows = [{"config": dict(config)}, {"config": {**config, key: f"another {key}"}}]
        assert (summarize.group_runs(rows) == [[0, 1]]) == (key in same_experiment), key


def test_summarize_imports_no_torch():
    code = "import sys, tools.summarize, utils.run_dir; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('torch', 'model', 'datasets', 'solver', 'processor', 'numpy', 'PIL')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_test_script_records_its_results(tiny_cuhk_root, tmp_path, capsys):
    res = train.main(tiny_train_argv(tiny_cuhk_root, str(tmp_path / "logs"), "--num_epoch", "2"))
    run_dir = res["run_dir"]
    config = os.path.join(run_dir, "configs.yaml")
    results = {ck: test_script.main(["--config_file", config, "--checkpoint", os.path.join(run_dir, ck),
                                     "--device", "cpu"]) for ck in ("best.pth", "last.pth")}
    table = json.load(open(os.path.join(run_dir, TEST_METRICS_FILE)))
    assert set(table) == {"best.pth", "last.pth"}
    for ck, metrics in results.items():
        epoch = torch.load(os.path.join(run_dir, ck), weights_only=True)["epoch"]
        assert table[ck] == {"checkpoint": os.path.join(os.path.abspath(run_dir), ck), "epoch": epoch,
                             "split": "test", "dataset_name": "CUHK-PEDES", "trained_on": "CUHK-PEDES",
                             "root_dir": os.path.abspath(tiny_cuhk_root), **{k: float(v) for k, v in metrics.items()}}
    assert table["best.pth"]["epoch"] == res["best_epoch"] and table["last.pth"]["epoch"] == 2

    capsys.readouterr()
    (row,) = main([run_dir])["runs"]
    assert row["best_epoch"] == res["best_epoch"] and row["last_epoch"] == 2 and row["notes"] == []
    assert row["best_R1"] == pytest.approx(results["best.pth"]["R1"])
    assert row["last_mINP"] == pytest.approx(results["last.pth"]["mINP"])
    assert row["seed"] == 1  # the default seed, as saved in configs.yaml

    # test.py --root_dir <other data>: recorded, and the summary flags the row
    other = tmp_path / "other_data"
    shutil.copytree(tiny_cuhk_root, other)
    test_script.main(["--config_file", config, "--checkpoint", os.path.join(run_dir, "last.pth"), "--device", "cpu",
                      "--root_dir", str(other)])
    assert json.load(open(os.path.join(run_dir, TEST_METRICS_FILE)))["last.pth"]["root_dir"] == str(other)
    (row,) = main([run_dir])["runs"]
    (note,) = row["notes"]
    assert note.startswith("last.pth tested on other data than the run trained on: root_dir") and str(other) in note


STUB = """#!{python}
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
if argv[0] == "train.py":
    seed = argv[argv.index("--seed") + 1] if "--seed" in argv else "config"
    run = os.path.join(os.environ["STUB_RUNS"], "run_" + seed)
    os.makedirs(run)
    for ck in ("last.pth",) + (() if seed == "2" else ("best.pth",)):  # seed 2 never saved a best.pth
        open(os.path.join(run, ck), "w").close()
    print("IRRA INFO: Using 1 process(es) on cpu; run dir " + run)
"""


@pytest.mark.parametrize("dataset", ["demo", "RSTPReid"])
def test_run_irra_sh_seeds_loop(dataset, tmp_path):
    """run_irra.sh with SEEDS: one training per seed (--seed), each followed by test.py on best.pth and last.pth,
    then the summary over the runs; without SEEDS the recipe trains once with the config's seed."""
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    log, runs = tmp_path / "calls.jsonl", tmp_path / "runs"
    runs.mkdir()
    env = dict(os.environ, PYTHON=str(stub), STUB_LOG=str(log), STUB_RUNS=str(runs), SEEDS=" 1  2 ")
    proc = subprocess.run(["bash", os.path.join(REPO, "run_irra.sh"), dataset, "--lr", "1e-4"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    r1, r2 = str(runs / "run_1"), str(runs / "run_2")

    def tested(run, ck):
        return ["test.py", "--config_file", f"{run}/configs.yaml", "--checkpoint", f"{run}/{ck}"]

    assert [c[0] for c in calls] == ["train.py", "test.py", "test.py", "train.py", "test.py", "-m"]
    assert calls[0][-4:] == ["--lr", "1e-4", "--seed", "1"] and calls[3][-4:] == ["--lr", "1e-4", "--seed", "2"]
    assert calls[1:3] == [tested(r1, "best.pth"), tested(r1, "last.pth")]
    assert calls[4] == tested(r2, "last.pth")
    assert f"{r2}/best.pth does not exist: not tested" in proc.stderr
    assert calls[5] == ["-m", "tools.summarize", r1, r2]
    if dataset == "demo":
        assert calls[0][:3] == ["train.py", "--config", "configs/demo.yaml"]
        assert f"Run directory: {r1}\nRun directory: {r2}\n" in proc.stdout
    else:
        assert calls[0][:3] == ["train.py", "--config", "configs/rstpreid.yaml"] and "--MLM" in calls[0]

    # without SEEDS: the dataset recipe trains once with the config's seed (as before), the demo also tests and sums up
    log.unlink()
    env["SEEDS"] = ""
    proc = subprocess.run(["bash", os.path.join(REPO, "run_irra.sh"), dataset], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert not any("--seed" in c for c in calls)
    rc = str(runs / "run_config")
    if dataset == "demo":
        assert calls[1:] == [tested(rc, "best.pth"), tested(rc, "last.pth"), ["-m", "tools.summarize", rc]]
    else:
        assert len(calls) == 1 and calls[0][0] == "train.py"

    env["SEEDS"] = "1 x"
    bad = subprocess.run(["bash", os.path.join(REPO, "run_irra.sh"), dataset], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "'x' is not an integer" in bad.stderr
