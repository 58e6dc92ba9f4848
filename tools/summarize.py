"""What a run is worth, over seeds:  python -m tools.summarize logs/CUHK-PEDES/<run> [<run> ...]  (or logs/CUHK-PEDES)

One epoch's test score is a noisy estimate, and a checkpoint chosen on the test split flatters it. This prints, per
run: its seed, the epoch with the best val R1 (``metrics.jsonl``, the training's rule: the first maximum wins), the
test metrics of that checkpoint (``best.pth``) and of the last epoch (``last.pth``), both read from the
``test_metrics.json`` that ``test.py`` writes next to the checkpoints; then, for the runs whose ``configs.yaml`` differ
only in the seed (and the name / output directory / run-state keys), a mean ± sample-std row. A missing or unreadable
file becomes a note in the table, never an error; a run that cannot be read at all is skipped with a warning. A
checkpoint tested on other data than its run trained on (``test.py --root_dir``) is flagged. A run with noisy
correspondences names the noise rate asked for and the one its training pairs had (``noisy_rate_measured``).

Only the standard library, PyYAML and prettytable are imported (no torch): it runs anywhere the logs are. The
files' names and readers are ``utils/run_dir.py``'s (where ``write_test_metrics``, used by ``test.py``, lives).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

from prettytable import PrettyTable

from tools.cross_domain import cross_domain_cells, format_cross_domain, read_tables
from utils.iotools import read_yaml
from utils.run_dir import (BEST_CHECKPOINT, CONFIG_FILE, LAST_CHECKPOINT, METRICS_FILE, RUN_FILES, RUN_STATE_KEYS,
                           TEST_METRICS_FILE, finite_number, is_run_dir, read_metrics, read_test_metrics)

logger = logging.getLogger("IRRA.summarize")

METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")
# Metrics shown when some run has them (test.py --metrics / UFine6926; utils/msd.py).
OPTIONAL_METRICS = ("mSD", "mSD_rank_order")
# configs.yaml keys that do not make two runs different experiments: the seed, the run's name and directory, and
# the run-state keys.
IGNORED_CONFIG_KEYS = ("seed", "name", "output_dir", *RUN_STATE_KEYS)
# The table's numeric columns: the val-best epoch and best.pth's test metrics, the last epoch and last.pth's.
COLUMNS = ("best_epoch", *(f"best_{m}" for m in METRIC_NAMES + OPTIONAL_METRICS), "last_epoch",
           *(f"last_{m}" for m in METRIC_NAMES + OPTIONAL_METRICS))
DECIMALS = 2  # metrics in the table
EPOCH_DECIMALS = 1  # mean / std of epochs
MAX_DIFFERING_SHOWN = 4  # options named in a group's row when groups differ


# ------------------------------------------------------------------------------------------------------------ reading
def find_runs(paths: Sequence[str]) -> List[str]:
    """The run directories named by ``paths``: each is a run directory or a folder whose subfolders are runs (sorted
    by name, i.e. by start time for ours). A path that does not exist or holds no run raises ``FileNotFoundError``."""
    runs: List[str] = []
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"{p}: no such directory (expected a run directory logs/<dataset>/<run> or a "
                                    f"folder of them)")
        if is_run_dir(p):
            found = [p]
        else:
            found = [os.path.join(p, d) for d in sorted(os.listdir(p)) if is_run_dir(os.path.join(p, d))]
            if not found:
                raise FileNotFoundError(f"{p}: neither a run directory nor a folder of runs (no {', '.join(RUN_FILES)} "
                                        f"in it or its subfolders)")
        runs += [r for r in found if os.path.realpath(r) not in {os.path.realpath(x) for x in runs}]
    return runs


def _read_config(run_dir: str, notes: List[str]) -> Optional[dict]:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        notes.append(f"no {CONFIG_FILE} (not grouped)")
        return None
    try:
        cfg = read_yaml(path, CONFIG_FILE)  # also reads the original's !!python/tuple
    except (OSError, ValueError) as e:
        notes.append(f"{CONFIG_FILE} unreadable (not grouped): {str(e).splitlines()[0]}")
        return None
    if not isinstance(cfg, dict):
        notes.append(f"{CONFIG_FILE} is not a mapping (not grouped)")
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}  # the original's tuples = our lists


def _read_val_metrics(run_dir: str, notes: List[str]) -> List[dict]:
    """The records of metrics.jsonl that have an epoch and an R1 (others skipped with a note)."""
    if not os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
        notes.append(f"no {METRICS_FILE}")
        return []
    try:
        records, bad = read_metrics(run_dir)  # a last line cut by an interrupted append is skipped with a warning
    except OSError as e:
        notes.append(f"{METRICS_FILE} unreadable: {e}")
        return []
    if bad:
        notes.append(f"{METRICS_FILE} line(s) {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''} "
                     f"skipped (not a JSON record with epoch and R1)")
    if not records and not bad:
        notes.append(f"{METRICS_FILE} is empty")
    return records


def best_val_epoch(records: Sequence[dict]) -> Optional[int]:
    """The epoch with the highest val R1, as training picks best.pth: the first maximum wins, and an R1 must exceed
    0 (training starts from ``best_top1 = 0``). None when no record qualifies."""
    best_r1, best_epoch = 0.0, None
    for rec in records:
        if rec["R1"] > best_r1:
            best_r1, best_epoch = float(rec["R1"]), int(rec["epoch"])
    return best_epoch


def _read_test_metrics(run_dir: str, notes: List[str]) -> Dict[str, dict]:
    if not os.path.isfile(os.path.join(run_dir, TEST_METRICS_FILE)):
        notes.append(f"no {TEST_METRICS_FILE} (run test.py on {BEST_CHECKPOINT} and {LAST_CHECKPOINT})")
        return {}
    try:
        return read_test_metrics(run_dir)
    except (OSError, ValueError) as e:
        notes.append(f"{TEST_METRICS_FILE} unreadable: {e}")
        return {}


# What a test_metrics.json entry records about the data it was measured on, and the configs.yaml key it must match.
TEST_DATA_KEYS = ("dataset_name", "root_dir")


def _same_data(key: str, tested: Any, trained: Any) -> bool:
    if key == "root_dir":  # the recorded root is absolute; the config's may be relative to where training ran
        return os.path.realpath(str(tested)) == os.path.realpath(str(trained))
    return tested == trained


def _other_test_data(rec: dict, cfg: Optional[dict]) -> List[str]:
    """``key: tested (config: trained)`` for each of :data:`TEST_DATA_KEYS` whose tested value differs."""
    if not cfg:
        return []
    return [f"{k} {rec[k]!r} (config: {cfg[k]!r})" for k in TEST_DATA_KEYS
            if rec.get(k) is not None and cfg.get(k) is not None and not _same_data(k, rec[k], cfg[k])]


def _noise_rates(cfg: Optional[dict], notes: List[str]) -> tuple:
    """(``noisy_rate`` asked, ``noisy_rate_measured`` from the training pairs) of a run's config (None when not
    recorded); a run with noise gets a note naming both."""
    asked = finite_number((cfg or {}).get("noisy_rate"))
    measured = finite_number((cfg or {}).get("noisy_rate_measured"))
    if (asked or measured) and measured is not None:
        notes.append(f"noisy_rate {asked:g}, measured {measured:.4f}" if asked is not None
                     else f"measured noisy rate {measured:.4f}")
    elif asked:
        notes.append(f"noisy_rate {asked:g} (measured rate not recorded)")
    return asked, measured


def read_run(run_dir: str) -> Dict[str, Any]:
    """One row of the table for ``run_dir``: ``run`` (its name), ``run_dir``, ``seed``, ``config``, ``noisy_rate`` and
    ``noisy_rate_measured`` (the noise asked for and the noise the training pairs had, None when not recorded), the
    numbers of ``COLUMNS`` (None when unknown) and ``notes`` (what is missing or inconsistent)."""
    notes: List[str] = []
    cfg = _read_config(run_dir, notes)
    row: Dict[str, Any] = {"run": os.path.basename(os.path.normpath(run_dir)), "run_dir": os.path.abspath(run_dir),
                           "seed": cfg.get("seed") if cfg else None, "config": cfg, **{c: None for c in COLUMNS}}
    row["noisy_rate"], row["noisy_rate_measured"] = _noise_rates(cfg, notes)
    records = _read_val_metrics(run_dir, notes)
    row["best_epoch"] = best_val_epoch(records)
    if records and row["best_epoch"] is None:
        notes.append(f"no epoch with val R1 > 0 (no {BEST_CHECKPOINT})")
    last_logged = int(max(r["epoch"] for r in records)) if records else None

    tested = _read_test_metrics(run_dir, notes)
    for prefix, ckpt, logged_epoch, what in (("best", BEST_CHECKPOINT, row["best_epoch"], "the val-best epoch is"),
                                             ("last", LAST_CHECKPOINT, last_logged, f"{METRICS_FILE} ends at")):
        rec = tested.get(ckpt)
        if rec is None:
            if tested:
                notes.append(f"{ckpt} not tested")
            if prefix == "last":
                row["last_epoch"] = last_logged
            continue
        for m in METRIC_NAMES + OPTIONAL_METRICS:
            row[f"{prefix}_{m}"] = finite_number(rec.get(m))
        missing = [m for m in METRIC_NAMES if row[f"{prefix}_{m}"] is None]
        if missing:
            notes.append(f"{ckpt}: no {'/'.join(missing)} in {TEST_METRICS_FILE}")
        epoch = finite_number(rec.get("epoch"))
        if rec.get("split", "test") != "test":
            notes.append(f"{ckpt} was evaluated on split {rec.get('split')!r}, not 'test'")
        other = _other_test_data(rec, cfg)
        if other:
            notes.append(f"{ckpt} tested on other data than the run trained on: {', '.join(other)}")
        if epoch is not None and logged_epoch is not None and int(epoch) != logged_epoch:
            notes.append(f"{ckpt} tested at epoch {int(epoch)} but {what} {logged_epoch}: rerun test.py?")
        if prefix == "last":
            row["last_epoch"] = int(epoch) if epoch is not None else last_logged
    row["notes"] = notes
    return row


# ------------------------------------------------------------------------------------------------------------ groups
def _comparable(cfg: Optional[dict]) -> Optional[dict]:
    return None if cfg is None else {k: v for k, v in cfg.items() if k not in IGNORED_CONFIG_KEYS}


def group_runs(rows: Sequence[Dict[str, Any]]) -> List[List[int]]:
    """Indices of ``rows`` grouped by configuration (configs.yaml without ``IGNORED_CONFIG_KEYS``), in the order of
    first appearance; a run without a readable configs.yaml is a group of its own."""
    groups: List[List[int]] = []
    keys: List[Optional[dict]] = []
    for i, row in enumerate(rows):
        key = _comparable(row["config"])
        for g, k in zip(groups, keys):
            if key is not None and k == key:
                g.append(i)
                break
        else:
            groups.append([i])
            keys.append(key)
    return groups


def group_stats(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Per column of ``COLUMNS``: ``mean``, ``std`` (sample standard deviation, n - 1; None for fewer than two
    values) and ``n`` over the rows that have a value."""
    mean, std, n = {}, {}, {}
    for c in COLUMNS:
        values = [r[c] for r in rows if r[c] is not None]
        n[c] = len(values)
        mean[c] = statistics.mean(values) if values else None
        std[c] = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": mean, "std": std, "n": n}


def _differing_options(configs: Sequence[Optional[dict]]) -> List[Dict[str, Any]]:
    """For each config, the options (outside ``IGNORED_CONFIG_KEYS``) whose values are not the same in all."""
    known = [_comparable(c) for c in configs if c is not None]
    keys = sorted({k for c in known for k in c})
    differ = [k for k in keys if any(c.get(k, "<unset>") != known[0].get(k, "<unset>") for c in known)]
    return [{} if c is None else {k: _comparable(c).get(k, "<unset>") for k in differ} for c in configs]


def summarize_runs(paths: Sequence[str]) -> Dict[str, Any]:
    """Read the runs named by ``paths`` (see ``find_runs``). Returns ``{"runs": rows (read_run), "groups": [...]}``,
    each group ``{"runs": [row indices], "seeds": [...], "options": {the options that set it apart}, "notes": [...],
    **group_stats}``."""
    rows = []
    for r in find_runs(paths):
        try:
            rows.append(read_run(r))
        except Exception as e:  # noqa: BLE001 - one unreadable run must not hide the others
            logger.warning("%s: skipped, cannot be read (%s: %s)", r, type(e).__name__, e)
    groups = []
    indices = group_runs(rows)
    differing = _differing_options([rows[g[0]]["config"] for g in indices]) if len(indices) > 1 else [{}] * len(indices)
    for g, options in zip(indices, differing):
        members = [rows[i] for i in g]
        stats = group_stats(members)
        notes = []
        if any((r["config"] or {}).get("val_dataset") == "test" for r in members):
            notes.append("@best chosen on the test split (val_dataset: test)")
        for prefix, what in (("best", BEST_CHECKPOINT), ("last", LAST_CHECKPOINT)):
            k = stats["n"][f"{prefix}_R1"]
            if k < len(members):
                notes.append(f"{what} tested in {k} of {len(members)} runs")
        groups.append({"runs": g, "seeds": [r["seed"] for r in members], "options": options, "notes": notes, **stats})
    return {"runs": rows, "groups": groups}


# ------------------------------------------------------------------------------------------------------------- table
def _fmt(value: Optional[float], column: str) -> str:
    if value is None:
        return "-"
    if column.endswith("epoch"):
        return str(int(value)) if float(value).is_integer() else f"{value:.{EPOCH_DECIMALS}f}"
    return f"{value:.{DECIMALS}f}"


def _fmt_mean_std(mean: Optional[float], std: Optional[float], column: str) -> str:
    if mean is None:
        return "-"
    decimals = EPOCH_DECIMALS if column.endswith("epoch") else DECIMALS
    return f"{mean:.{decimals}f} ± " + ("-" if std is None else f"{std:.{decimals}f}")


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_table(summary: Dict[str, Any]) -> str:
    """The summary as a text table: each group's runs, then its ``mean ± std`` row."""
    rows = summary["runs"]
    shown = [m for m in METRIC_NAMES + OPTIONAL_METRICS
             if m in METRIC_NAMES or any(r[f"{p}_{m}"] is not None for r in rows for p in ("best", "last"))]
    columns = ("best_epoch", *(f"best_{m}" for m in shown), "last_epoch", *(f"last_{m}" for m in shown))
    headers = ["run", "seed", "val-best ep", *(f"{m}@best" for m in shown), "last ep", *(f"{m}@last" for m in shown),
               "note"]
    table = PrettyTable(headers)
    table.align = "r"
    table.align["run"] = table.align["note"] = "l"
    for gi, group in enumerate(summary["groups"]):
        for i in group["runs"]:
            r = rows[i]
            table.add_row([r["run"], "-" if r["seed"] is None else r["seed"], *(_fmt(r[c], c) for c in columns),
                           "; ".join(r["notes"])])
        options = ", ".join(f"{k}={_short(v)}" for k, v in list(group["options"].items())[:MAX_DIFFERING_SHOWN])
        if len(group["options"]) > MAX_DIFFERING_SHOWN:
            options += f", +{len(group['options']) - MAX_DIFFERING_SHOWN} more"
        seeds = " ".join("-" if s is None else str(s) for s in group["seeds"])
        table.add_row([f"mean ± std ({len(group['runs'])} run{'s' if len(group['runs']) > 1 else ''})", seeds,
                       *(_fmt_mean_std(group["mean"][c], group["std"][c], c) for c in columns),
                       "; ".join(([options] if options else []) + group["notes"])],
                      divider=gi < len(summary["groups"]) - 1)
    legend = (f"@best: {BEST_CHECKPOINT}, the epoch with the best R1 on the val_dataset split ({METRICS_FILE}); "
              f"@last: {LAST_CHECKPOINT}; both on the test split ({TEST_METRICS_FILE}). mean ± sample std over runs that differ only "
              f"in seed.")
    return legend + "\n" + table.get_string()


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``python -m tools.summarize RUN_OR_FOLDER [...]``: print the table; returns ``summarize_runs``'s result."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m tools.summarize", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (logs/<dataset>/<run>) or folders of runs")
    parser.add_argument("--cross_domain", action="store_true",
                        help="also print the train set x test set table (test.py --dataset_name results)")
    parser.add_argument("--metric", default="R1", choices=METRIC_NAMES + OPTIONAL_METRICS,
                        help="--cross_domain: the metric of the cells")
    parser.add_argument("--checkpoint", default=BEST_CHECKPOINT, choices=(BEST_CHECKPOINT, LAST_CHECKPOINT),
                        help="--cross_domain: the checkpoint of the cells")
    cli = parser.parse_args(argv)
    summary = summarize_runs(cli.runs)
    print(format_table(summary))
    if cli.cross_domain:
        rows = summary["runs"]
        cells = cross_domain_cells(rows, read_tables([r["run_dir"] for r in rows], read_test_metrics),
                                   cli.checkpoint, cli.metric)
        summary["cross_domain"] = {f"{a} -> {b}": v for (a, b), v in cells.items()}
        print(format_cross_domain(cells, cli.checkpoint, cli.metric))
    return summary


if __name__ == "__main__":
    from utils.cli import run_main

    run_main(main, sys.argv[1:], prog="python -m tools.summarize")
