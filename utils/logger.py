"""Logging setup: stdout + a log file in the run directory, on rank 0 only."""
from __future__ import annotations

import logging
import os
import sys

from utils.run_dir import LOG_FILE, TEST_LOG_FILE


def setup_logger(name: str, save_dir: str, if_train: bool, distributed_rank: int = 0) -> logging.Logger:
    """Configure logger ``name`` (e.g. ``"IRRA"``; children ``IRRA.*`` propagate to it).

    Rank 0 logs INFO to stdout and to ``save_dir/train_log.txt`` (or ``test_log.txt``); other ranks only log
    warnings and errors to stdout. Calling it again replaces the handlers instead of duplicating them.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
    ch = logging.StreamHandler(stream=sys.stdout)
    ch.setLevel(logging.DEBUG if distributed_rank == 0 else logging.WARNING)
    ch.setFormatter(fmt)
    logger.addHandler(ch)
    if distributed_rank == 0 and save_dir:
        os.makedirs(save_dir, exist_ok=True)
        fname = LOG_FILE if if_train else TEST_LOG_FILE
        fh = logging.FileHandler(os.path.join(save_dir, fname), mode="a")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger
