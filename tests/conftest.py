"""Shared fixtures and helpers: a tiny generated dataset in the CUHK-PEDES layout, tiny training options, a batch
of made-up inputs, and test.py loaded as a module."""
import contextlib
import importlib.util
import logging
import os

import pytest
import torch

from datasets.synthpedes import _write_dataset, synth_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# test.py is loaded by path: "test" is also the name of a package of the standard library.
_spec = importlib.util.spec_from_file_location("irra_test_script", os.path.join(REPO, "test.py"))
test_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_script)

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


def make_batch(bs=4, length=77, img=(64, 32), seed=0, varied=False):
    """A training batch of random images and made-up captions (SOT, random BPE ids, EOT) for IRRA.forward.

    ``varied=False``: captions of 5 + 3i tokens, word 2 masked. ``varied=True``: captions of 6 + 4i tokens (so a fast
    path cuts them), 1-2 masked words each at different positions (so the last cross-modal block computes a prefix of
    the queries)."""
    g = torch.Generator().manual_seed(seed)
    caps = torch.zeros(bs, length, dtype=torch.long)
    labels = torch.zeros_like(caps)
    for i in range(bs):
        n = 6 + 4 * i if varied else 5 + 3 * i
        caps[i, 0] = 49406
        caps[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
        caps[i, n] = 49407
        for p in ({2, 1 + 3 * i} if varied else {2}):
            labels[i, p] = caps[i, p]
    mlm_ids = torch.where(labels != 0, torch.full_like(caps, 49405), caps)
    return dict(images=torch.randn(bs, 3, *img, generator=g), caption_ids=caps, pids=torch.tensor([0, 0, 1, 3])[:bs],
                image_ids=torch.arange(bs), mlm_ids=mlm_ids, mlm_labels=labels)


# A tiny trained run, shared by tests/test_visualize.py and tests/test_search_page.py (module-scoped: each module
# trains its own, so the two never share a gallery cache).
TINY = dict(num_train_ids=6, num_val_ids=0, num_test_ids=5, images_per_id=2, img_height=64, img_width=32, seed=3,
            show_progress=False)
TINY_RUN = ["--pretrain_choice", "scratch:ViT-Micro", "--img_size", "64", "32", "--loss_names", "sdm+id"]


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    """Registry entry SynthPEDES -> a tiny generated set (5 test identities, 10 images, 20 captions; the default one
    is 1440 images)."""
    import functools

    from datasets import build as dbuild
    from datasets.synthpedes import SynthPEDES

    mp = pytest.MonkeyPatch()
    mp.setitem(dbuild.DATASET_REGISTRY, "SynthPEDES", functools.partial(SynthPEDES, **TINY))
    yield tmp_path_factory.mktemp("data")
    mp.undo()


@pytest.fixture(scope="module")
def run_dir(tiny_synth, tmp_path_factory):
    """A real run: train.main for one epoch of a scratch ViT-Micro (sdm+id) on the tiny SynthPEDES."""
    from pathlib import Path

    import train

    out = train.main(TINY_RUN + ["--dataset_name", "SynthPEDES", "--root_dir", str(tiny_synth), "--output_dir",
                                 str(tmp_path_factory.mktemp("logs")), "--num_epoch", "1", "--batch_size", "4",
                                 "--test_batch_size", "8", "--num_workers", "0", "--device", "cpu", "--name", "tiny"])
    run = Path(out["run_dir"])
    assert (run / "configs.yaml").is_file() and (run / "best.pth").is_file()
    return run


def independent_similarity(run, split):
    """Caption x test-image cosine similarity computed without search/retrieval.py or the page."""
    import torch.nn.functional as F
    from PIL import Image

    from datasets import build as dbuild
    from model.build import build_model
    from utils.options import get_args
    from utils.simple_tokenizer import SimpleTokenizer, tokenize

    sd = torch.load(run / "best.pth", weights_only=True)["model"]
    model = build_model(get_args(TINY_RUN), num_classes=sd["classifier.weight"].shape[0],
                        device=torch.device("cpu")).eval()
    model.load_state_dict(sd)
    tf = dbuild.build_transforms((64, 32), is_train=False)
    tok = SimpleTokenizer()
    with torch.no_grad():
        img = torch.stack([tf(Image.open(p).convert("RGB")) for p in split["img_paths"]])
        txt = torch.stack([tokenize(c, tok, 77) for c in split["captions"]])
        return F.normalize(model.encode_text(txt), dim=-1) @ F.normalize(model.encode_image(img), dim=-1).T
