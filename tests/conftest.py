"""Shared fixtures: a tiny generated dataset in the CUHK-PEDES layout and tiny training options."""
import contextlib
import logging
import os

import pytest

from datasets.synthpedes import _write_dataset, synth_params

TINY_SYNTH = dict(num_train_ids=8, num_val_ids=2, num_test_ids=4, images_per_id=2, img_height=64, img_width=32, seed=3)


@pytest.fixture(scope="session")
def tiny_cuhk_root(tmp_path_factory):
    """``<root>/CUHK-PEDES/{imgs/, reid_raw.json}`` with SynthPEDES pictures: 8 train / 2 val / 4 test ids."""
    root = tmp_path_factory.mktemp("data")
    out = root / "CUHK-PEDES"
    os.makedirs(out)
    _write_dataset(str(out), synth_params(**TINY_SYNTH), show_progress=False)
    return str(root)


def tiny_train_argv(root: str, logs: str, *extra: str) -> list:
    """Options for a seconds-long CPU training run of a 64-wide, 1+1-layer IRRA on the tiny dataset."""
    return ["--dataset_name", "CUHK-PEDES", "--root_dir", root, "--output_dir", logs, "--name", "tiny",
            "--pretrain_choice", "scratch:ViT-Micro", "--img_size", "64", "32", "--batch_size", "8",
            "--test_batch_size", "16", "--num_workers", "0", "--num_epoch", "2", "--MLM",
            "--loss_names", "sdm+mlm+id", "--cmt_depth", "1", "--device", "cpu", "--log_period", "1",
            "--optimizer", "AdamW", "--lr", "1e-3", "--warmup_epochs", "1", *extra]


@contextlib.contextmanager
def retrieval_warnings():
    """Collect IRRA.retrieval warnings with a handler on that logger (the trainer's setup_logger turns off
    propagation of "IRRA", so pytest's caplog on the root logger may not see them)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    lg = logging.getLogger("IRRA.retrieval")
    lg.addHandler(handler)
    try:
        yield records
    finally:
        lg.removeHandler(handler)


@pytest.fixture(autouse=True)
def _reset_irra_logger():
    """train.main / test.main call setup_logger("IRRA"), which stops propagation to the root logger (as detectron's
    does); undo it after each test so that pytest's caplog sees IRRA.* records whatever the test order."""
    yield
    lg = logging.getLogger("IRRA")
    for h in list(lg.handlers):
        lg.removeHandler(h)
        h.close()
    lg.propagate = True
    lg.setLevel(logging.NOTSET)
