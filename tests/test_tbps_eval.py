"""TBPS-CLIP's evaluation against TBPS's own (tests/fixtures/tbps/tbps_eval.json, see the README there):
``tbps_checkpoint.pth`` on the test split of the default SynthPEDES (generator version 2, seed 0: 80 test
identities, 320 images, 640 captions) with TBPS's test-time preprocessing, ranked by the project's Evaluator."""
import json
import os
import os.path as op
import random
import shutil

import numpy as np
import pytest
import torch

from datasets import synthpedes as sp
from methods.tbps.checkpoint import arch_from_state_dict, load_tbps_weights, read_tbps_checkpoint
from methods.tbps.data import eval_loaders, eval_transform
from methods.tbps.model import TBPS, TBPSLossConfig
from utils.metrics import Evaluator

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "tbps")
CKPT = os.path.join(HERE, "tbps_checkpoint.pth")


def write_synthpedes_test_split(root: str) -> str:
    """``<root>/SynthPEDES`` holding only the test split of the default SynthPEDES, drawn exactly as
    ``datasets/synthpedes.py:_write_dataset`` draws it (same identities, same per-image generators), with the default
    dataset's meta.json (so SynthPEDES reads it as it is). A quarter of the full generation's work."""
    params = sp.synth_params()
    out = op.join(root, sp.SynthPEDES.dataset_dir)
    n_train, n_val, n_test = params["num_train_ids"], params["num_val_ids"], params["num_test_ids"]
    idents = sp.sample_identities(n_train + n_val + n_test, random.Random(params["seed"]))
    os.makedirs(op.join(out, "imgs", "test"))
    annos = []
    for i in range(n_train + n_val, len(idents)):
        pid = i + 1
        for k in range(params["images_per_id"]):
            img_rng = random.Random(f"{params['seed']}-{pid}-{k}")
            img = sp.render_person(idents[i], params["img_height"], params["img_width"], img_rng)
            rel = f"test/{pid:04d}_{k}.png"
            img.save(op.join(out, "imgs", rel), format="PNG", optimize=False)
            caps = [sp.make_caption(idents[i], img_rng)]
            for _ in range(20):
                c = sp.make_caption(idents[i], img_rng)
                if c != caps[0]:
                    break
            caps.append(c)
            annos.append({"split": "test", "captions": caps, "file_path": rel, "processed_tokens": [], "id": pid})
    with open(op.join(out, sp.ANNO_FILE), "w") as f:
        json.dump(annos, f)
    with open(op.join(out, sp.META_FILE), "w") as f:
        json.dump({"generator_version": sp.GENERATOR_VERSION, "params": params}, f)
    return out


@pytest.fixture(scope="module")
def want():
    with open(os.path.join(HERE, "tbps_eval.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def synth_test(tmp_path_factory, want):
    assert sp.GENERATOR_VERSION == 2, "tbps_eval.json was computed on SynthPEDES generator version 2"
    root = str(tmp_path_factory.mktemp("synth"))
    write_synthpedes_test_split(root)
    return sp.SynthPEDES(root, verbose=False, show_progress=False)


def test_tbps_checkpoint_on_synthpedes_test_matches_tbps(synth_test, want):
    test = synth_test.test
    assert (len(test["img_paths"]), len(test["captions"])) == (want["num_images"], want["num_texts"])
    img_size = tuple(want["input_resolution"])
    img_loader, txt_loader = eval_loaders(test, img_size, batch_size=128)
    assert txt_loader.dataset.captions[:5] == want["first_texts"]
    sd = read_tbps_checkpoint(CKPT)
    model = TBPS(arch_from_state_dict(sd, img_size, head_width=32), TBPSLossConfig(ss=False), dropout=0.05)
    load_tbps_weights(model, sd, source=CKPT)
    got = Evaluator(img_loader, txt_loader, split="test").eval(model)
    m = want["metrics"]
    assert got["R1"] == pytest.approx(m["r1"], abs=1e-4)
    assert got["R5"] == pytest.approx(m["r5"], abs=1e-4)
    assert got["R10"] == pytest.approx(m["r10"], abs=1e-4)
    assert got["mAP"] == pytest.approx(m["mAP"], abs=1e-3)


def test_eval_transform_is_bicubic_with_imagenet_statistics(synth_test):
    from PIL import Image
    path = synth_test.test["img_paths"][0]
    x = eval_transform((64, 32))(Image.open(path).convert("RGB"))
    ref = Image.open(path).convert("RGB").resize((32, 64), Image.BICUBIC)
    ref = torch.from_numpy(np.asarray(ref).copy()).float().permute(2, 0, 1) / 255  # [H, W, 3] -> [3, H, W]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(x, (ref - mean) / std, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["model_only", "tbps_training"])
def test_test_py_on_a_checkpoint_with_no_run_directory(synth_test, want, tmp_path, monkeypatch, layout):
    """``python test.py --method tbps --checkpoint <file> --dataset_name ... --img_size H W``: TBPS's numbers, recorded
    next to the checkpoint; for {"model": ...} and for TBPS's training checkpoint {"model", "optimizer", "config":
    EasyDict} (read without the easydict package)."""
    from tests.conftest import test_script
    ckpt = tmp_path / "tbps_checkpoint.pth"
    if layout == "model_only":
        shutil.copy(CKPT, ckpt)
    else:
        import sys

        from tests.test_tbps_model import EASYDICT
        (tmp_path / "easydict.py").write_text(EASYDICT)
        monkeypatch.syspath_prepend(str(tmp_path))
        import easydict
        sd = read_tbps_checkpoint(CKPT)
        torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []},
                    "config": easydict.EasyDict({"model": {"embed_dim": 32}})}, ckpt)
        monkeypatch.delitem(sys.modules, "easydict")
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    h, w = want["input_resolution"]
    got = test_script.main(["--method", "tbps", "--checkpoint", str(ckpt), "--dataset_name", "SynthPEDES",
                            "--root_dir", os.path.dirname(synth_test.dataset_dir), "--img_size", str(h), str(w),
                            "--head_width", "32", "--device", "cpu", "--num_workers", "0"])
    m = want["metrics"]
    assert (got["R1"], got["R5"], got["R10"]) == pytest.approx((m["r1"], m["r5"], m["r10"]), abs=1e-4)
    assert got["mAP"] == pytest.approx(m["mAP"], abs=1e-3)
    with open(tmp_path / "test_metrics.json") as f:
        assert json.load(f)["tbps_checkpoint.pth"]["R1"] == pytest.approx(m["r1"], abs=1e-4)
    with pytest.raises(SystemExit):  # train.py's options only without --config_file
        test_script.main(["--config_file", str(tmp_path), "--img_size", "64", "32"])
