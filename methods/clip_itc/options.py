"""CLIP fine-tuning with the symmetric ITC loss (``--method clip_itc``): the baseline row of every paper. No option
of its own; its one loss is ``itc`` (the default of ``--loss_names`` under this method)."""
from __future__ import annotations

import argparse
from typing import List, Sequence, Tuple

LOSSES = ("itc",)
LOSS_SPELLINGS: dict = {}
CONTRASTIVE_LOSSES = ("itc",)
DEFAULTS = {"loss_names": "itc"}


def add_options(parser: argparse.ArgumentParser) -> None:
    """No option of its own."""


def clean_loss_names(names: Sequence[str]) -> List[str]:
    return list(names)


def check_options(args: argparse.Namespace, tasks: Sequence[str]) -> List[Tuple[str, bool, str]]:
    return [("MLM", not args.MLM, "off: clip_itc has no MLM head")]
