"""The train set x test set table over runs (``python -m tools.summarize --cross_domain RUNS``).

Each run's ``test_metrics.json`` holds its checkpoints' results per test dataset (``test.py --dataset_name B``
records "trained on A, tested on B" under ``<checkpoint>@B``, the in-domain result under the checkpoint's name:
``utils.run_dir.test_metrics_key``). A cell is the mean (± sample std over runs, their number) of one metric of one
checkpoint over the runs trained on the row's dataset and tested on the column's; the diagonal is in-domain.
Only the standard library and prettytable (no torch), like tools/summarize.py.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from prettytable import PrettyTable

from utils.choices import DATASETS
from utils.run_dir import finite_number

Cells = Dict[Tuple[str, str], List[float]]


def cross_domain_cells(rows: Sequence[Dict[str, Any]], tested: Sequence[Dict[str, dict]], checkpoint: str,
                       metric: str) -> Cells:
    """``{(trained on, tested on): [metric of each run]}`` from the runs' rows (``tools.summarize.read_run``: their
    config) and their ``test_metrics.json`` tables, for ``checkpoint`` (a file name such as best.pth)."""
    cells: Cells = {}
    for row, table in zip(rows, tested):
        trained_cfg = (row.get("config") or {}).get("dataset_name")
        for key, rec in table.items():
            if key != checkpoint and not key.startswith(checkpoint + "@"):
                continue
            trained, test = rec.get("trained_on") or trained_cfg, rec.get("dataset_name")
            value = finite_number(rec.get(metric))
            if trained is None or test is None or value is None:
                continue
            cells.setdefault((str(trained), str(test)), []).append(value)
    return cells


def _order(names) -> List[str]:
    known = [d for d in DATASETS if d in names]
    return known + sorted(n for n in names if n not in known)


def _cell(values: Optional[List[float]], decimals: int) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {statistics.stdev(values):.{decimals}f} ({len(values)})"


def format_cross_domain(cells: Cells, checkpoint: str, metric: str, decimals: int = 2) -> str:
    """The table: one row per train set, one column per test set (datasets in utils/choices.py order)."""
    trains = _order({a for a, _ in cells})
    tests = _order({b for _, b in cells} | set(trains))
    table = PrettyTable(["trained on \\ tested on", *tests])
    table.align = "r"
    table.align["trained on \\ tested on"] = "l"
    for a in trains:
        table.add_row([a, *(_cell(cells.get((a, b)), decimals) for b in tests)])
    legend = (f"{metric} of {checkpoint} (test split), trained on the row's dataset, tested on the column's (diagonal: "
              f"in-domain); mean ± sample std (runs) where several runs")
    return legend + "\n" + table.get_string()


def read_tables(run_dirs: Sequence[str], read) -> List[Dict[str, dict]]:
    """``read(run_dir)`` (``utils.run_dir.read_test_metrics``) of each run, {} where the file is missing or bad."""
    out = []
    for r in run_dirs:
        try:
            out.append(read(r))
        except (OSError, ValueError):
            out.append({})
    return out


__all__ = ["cross_domain_cells", "format_cross_domain", "read_tables"]
