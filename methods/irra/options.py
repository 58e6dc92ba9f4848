"""IRRA's options: the original's (``--loss_names sdm+id+mlm``, ``--cmt_depth``, ``--MLM``, ...) are the core table's
(``utils/options.py``), so IRRA adds no group; this module declares its loss names."""
from __future__ import annotations

import argparse
from typing import List, Sequence, Tuple

LOSSES = ("itc", "sdm", "cmpm", "id", "mlm")
LOSS_SPELLINGS: dict = {}  # other spellings of the loss names accepted in --loss_names
CONTRASTIVE_LOSSES = ("itc", "sdm", "cmpm")  # contrast a sample with the batch's others (batch >= 2)
DEFAULTS: dict = {}  # option defaults when --method irra (the table's are IRRA's)


def add_options(parser: argparse.ArgumentParser) -> None:
    """IRRA's options are the core table's."""


def clean_loss_names(names: Sequence[str]) -> List[str]:
    return list(names)


def check_options(args: argparse.Namespace, tasks: Sequence[str]) -> List[Tuple[str, bool, str]]:
    """(option, ok, expected) of IRRA's own checks."""
    return [("cmt_depth", args.cmt_depth >= 1 or "mlm" not in tasks, ">= 1 when the mlm loss is on")]
