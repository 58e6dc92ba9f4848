"""UFine6926 (datasets/ufine6926.py) on a generated set in its layout: parsing (contiguous train pids, paths relative
to the dataset folder, --anno_file), tools.check_dataset, the count of captions --text_length cuts, and a tiny model
that trains and evaluates at 168 tokens with mSD reported (UFine6926's protocol)."""
import json
import logging
import os

import pytest
import torch

import train
from datasets.bases import tokenize_all
from datasets.build import build_dataset
from tests.conftest import test_script, tiny_train_argv
from tests.protocol_data import ID_BASE, ID_STRIDE, UFINE_ANNO, write_ufine6926
from tools import check_dataset
from utils.simple_tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def ufine_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ufine")
    write_ufine6926(str(root))
    return str(root)


def test_parse_layout(ufine_root):
    ds = build_dataset("UFine6926", root=ufine_root, verbose=False)
    assert ds.anno_path == os.path.join(ufine_root, "UFine6926", UFINE_ANNO)
    pids = sorted({row[0] for row in ds.train})
    assert pids == list(range(6))  # contiguous, though the annotation's ids step by ID_STRIDE
    # pid k is the k-th smallest train id; SynthPEDES ids 1..6 are the train ones
    assert [ds.raw_train_id(p) for p in pids] == [ID_BASE + ID_STRIDE * i for i in range(1, 7)]
    for pid, _, path, _ in ds.train:
        assert path.startswith(os.path.join(ufine_root, "UFine6926", "pics", "train")) and os.path.isfile(path)
        assert ds.raw_train_id(pid) == ID_BASE + ID_STRIDE * int(os.path.basename(path)[:4])
    assert len(ds.train) == 6 * 2 * 3  # 6 ids x 2 images x 3 captions
    assert sorted(set(ds.test["image_pids"])) == [ID_BASE + ID_STRIDE * i for i in range(8, 12)]  # as annotated
    assert len(ds.test["img_paths"]) == 8 and len(ds.test["captions"]) == 24
    assert len(set(ds.val["image_pids"])) == 1


def test_anno_file_overrides_the_file_name(ufine_root, tmp_path):
    write_ufine6926(str(tmp_path), sentences=(1,), anno_name="recaptioned.json")
    ds = build_dataset("UFine6926", root=str(tmp_path), verbose=False, anno_file="recaptioned.json")
    assert ds.anno_path.endswith("recaptioned.json") and len(ds.train) == 12  # one caption per image
    with pytest.raises(FileNotFoundError, match="nothere.json.*--anno_file"):
        build_dataset("UFine6926", root=ufine_root, verbose=False, anno_file="nothere.json")


def test_check_dataset(ufine_root, capsys):
    code = check_dataset.main(["--dataset_name", "UFine6926", "--root_dir", ufine_root, "--text_length", "168",
                               "--no_progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "train: 6 ids, 12 images, 36 captions" in out and "OK" in out
    assert "--text_length 168 cuts" in out


def test_cut_captions_are_counted_and_logged(ufine_root, caplog):
    ds = build_dataset("UFine6926", root=ufine_root, verbose=False)
    tok = get_tokenizer()
    captions = ds.test["captions"]
    lengths = [len(tok.encode(c)) + 2 for c in captions]
    for length in (77, 168):
        expected = sum(n > length for n in lengths)
        with caplog.at_level(logging.INFO, logger="IRRA.dataset"):
            caplog.clear()
            tokenize_all(captions, tok, length, what="test")
        msgs = [r.getMessage() for r in caplog.records if "captions cut" in r.getMessage()]
        assert msgs == [f"test: {expected} of {len(captions)} captions cut at {length} tokens (--text_length)"]
    assert 0 < sum(n > 168 for n in lengths) < sum(n > 77 for n in lengths) < len(lengths)  # the set exercises both


def test_train_and_evaluate_at_168_tokens(ufine_root, tmp_path, caplog):
    argv = tiny_train_argv(ufine_root, str(tmp_path / "logs"), "--dataset_name", "UFine6926", "--text_length", "168",
                           "--num_epoch", "1", "--batch_size", "6")
    with caplog.at_level(logging.INFO):
        out = train.main(argv)
    run = out["run_dir"]
    with open(os.path.join(run, "train_log.txt"), encoding="utf-8") as f:
        log = f.read()
    assert "train: " in log and "of 36 captions cut at 168 tokens" in log
    assert "test: " in log and "of 24 captions cut at 168 tokens" in log
    sd = torch.load(os.path.join(run, "best.pth"), weights_only=True)["model"]
    assert sd["base_model.positional_embedding"].shape[0] == 168
    rec = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"), encoding="utf-8")][-1]
    assert {"mSD", "mSD_rank_order", "R1", "mAP"} <= set(rec)  # mSD always on UFine6926
    assert 0 < rec["mSD"] < 100 and 0 < rec["mSD_rank_order"] < 100
    metrics = test_script.main(["--config_file", run, "--device", "cpu"])
    assert metrics["mSD"] == pytest.approx(rec["mSD"], abs=1e-4)  # best.pth is this epoch's model
    with open(os.path.join(run, "test_metrics.json"), encoding="utf-8") as f:
        entry = json.load(f)["best.pth"]
    assert entry["mSD_rank_order"] == pytest.approx(metrics["mSD_rank_order"])
    assert entry["dataset_name"] == entry["trained_on"] == "UFine6926"
