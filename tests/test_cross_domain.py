"""Cross-domain evaluation on two generated sets in two layouts (CUHK-PEDES's imgs/ + reid_raw.json, UFine6926's
folder + UFine6926_Annotations_1024.json, other numbers of identities): test.py --dataset_name B evaluates a run
trained on A with the run's own model options, records "trained on A, tested on B" per target dataset, and
tools.summarize --cross_domain lays out the train set x test set table."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import train
from benchmarks.reference import msd_rank_naive, rank_naive
from datasets.bases import TextDataset
from datasets.build import build_dataset, build_transforms
from model.build import build_model_from_checkpoint
from tests.conftest import test_script, tiny_train_argv
from tests.protocol_data import write_ufine6926
from tools import summarize
from utils.checkpoint import model_state_dict, read_checkpoint
from utils.iotools import read_image
from utils.options import load_config_args
from utils.run_dir import TEST_METRICS_FILE


@pytest.fixture(scope="module")
def ufine_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ufine_x")
    write_ufine6926(str(root))
    return str(root)


@pytest.fixture(scope="module")
def cuhk_run(tiny_cuhk_root, tmp_path_factory):
    """A tiny run trained on the CUHK-PEDES-layout set (8 train identities) at text length 77."""
    out = train.main(tiny_train_argv(tiny_cuhk_root, str(tmp_path_factory.mktemp("logs")), "--num_epoch", "1"))
    return out["run_dir"]


def _independent_metrics(run, root):
    """R1 / mAP / mSD of the run's best.pth on UFine6926's test split, ranked by the reference functions from
    features encoded here (the run's text length and image size)."""
    args = load_config_args(os.path.join(run, "configs.yaml"), device="cpu")
    ckpt = os.path.join(run, "best.pth")
    model = build_model_from_checkpoint(args, model_state_dict(read_checkpoint(ckpt)), source=ckpt).eval()
    split = build_dataset("UFine6926", root=root, verbose=False).test
    tf = build_transforms(img_size=args.img_size, is_train=False)
    with torch.no_grad():
        img = torch.stack([tf(read_image(p)) for p in split["img_paths"]])
        txt = TextDataset(split["caption_pids"], split["captions"], text_length=args.text_length).caption_ids
        g = F.normalize(model.encode_image(img).float(), dim=1)
        q = F.normalize(model.encode_text(txt.long()).float(), dim=1)
    sim = q @ g.t()
    qp, gp = torch.tensor(split["caption_pids"]), torch.tensor(split["image_pids"])
    cmc, mAP, _, _ = rank_naive(sim, qp, gp)
    return float(cmc[0]), float(mAP), float(msd_rank_naive(sim, qp, gp)[1])


def test_trained_on_a_tested_on_b(cuhk_run, tiny_cuhk_root, ufine_root):
    in_domain = test_script.main(["--config_file", cuhk_run, "--device", "cpu"])
    assert "mSD" not in in_domain  # not asked, not UFine6926
    asked = test_script.main(["--config_file", cuhk_run, "--device", "cpu", "--metrics", "mSD"])
    assert {"mSD", "mSD_rank_order"} <= set(asked) and asked["R1"] == pytest.approx(in_domain["R1"])
    assert json.load(open(os.path.join(cuhk_run, TEST_METRICS_FILE)))["best.pth"]["mSD"] == pytest.approx(asked["mSD"])
    cross = test_script.main(["--config_file", cuhk_run, "--device", "cpu", "--dataset_name", "UFine6926",
                              "--root_dir", ufine_root])
    r1, mAP, msd = _independent_metrics(cuhk_run, ufine_root)
    assert cross["R1"] == pytest.approx(r1, abs=1e-3) and cross["mAP"] == pytest.approx(mAP, abs=1e-3)
    assert cross["mSD"] == pytest.approx(msd, abs=1e-3)  # UFine6926's protocol: mSD always
    table = json.load(open(os.path.join(cuhk_run, TEST_METRICS_FILE)))
    assert set(table) == {"best.pth", "best.pth@UFine6926"}
    assert table["best.pth"]["trained_on"] == table["best.pth"]["dataset_name"] == "CUHK-PEDES"
    entry = table["best.pth@UFine6926"]
    assert (entry["trained_on"], entry["dataset_name"]) == ("CUHK-PEDES", "UFine6926")
    assert entry["root_dir"] == os.path.abspath(ufine_root) and entry["R1"] == pytest.approx(cross["R1"])
    assert table["best.pth"]["mSD"] == pytest.approx(asked["mSD"])  # the in-domain result is kept
    # the run's classifier has 8 identities, UFine6926's train split 6: no error, the classifier is unused


def test_summarize_lays_out_train_x_test(cuhk_run, tiny_cuhk_root, ufine_root, tmp_path, capsys):
    out = train.main(tiny_train_argv(ufine_root, str(tmp_path / "logs"), "--dataset_name", "UFine6926",
                                     "--text_length", "168", "--num_epoch", "1", "--batch_size", "6"))
    ufine_run = out["run_dir"]
    test_script.main(["--config_file", ufine_run, "--device", "cpu"])
    to_cuhk = test_script.main(["--config_file", ufine_run, "--device", "cpu", "--dataset_name", "CUHK-PEDES",
                                "--root_dir", tiny_cuhk_root])
    for args in (["--config_file", cuhk_run, "--device", "cpu"],
                 ["--config_file", cuhk_run, "--device", "cpu", "--dataset_name", "UFine6926", "--root_dir", ufine_root]):
        test_script.main(args)
    capsys.readouterr()
    summary = summarize.main([cuhk_run, ufine_run, "--cross_domain"])
    text = capsys.readouterr().out
    tables = [json.load(open(os.path.join(r, TEST_METRICS_FILE))) for r in (cuhk_run, ufine_run)]
    expected = {"CUHK-PEDES -> CUHK-PEDES": [tables[0]["best.pth"]["R1"]],
                "CUHK-PEDES -> UFine6926": [tables[0]["best.pth@UFine6926"]["R1"]],
                "UFine6926 -> UFine6926": [tables[1]["best.pth"]["R1"]],
                "UFine6926 -> CUHK-PEDES": [to_cuhk["R1"]]}
    assert summary["cross_domain"] == pytest.approx(expected)
    lines = [ln for ln in text.splitlines() if ln.startswith("| CUHK-PEDES") or ln.startswith("| UFine6926")]
    assert len(lines) == 2 and f"{to_cuhk['R1']:.2f}" in lines[1]
    assert "mSD@best" in text  # the UFine6926 run reports mSD, so the run table shows it
