"""SynthPEDES: deterministic generation, CUHK-PEDES format, disjoint splits, reuse / atomic generation."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from datasets import synthpedes as sp
from datasets.build import build_dataset
from datasets.synthpedes import GARMENT_COLOURS, SynthPEDES

SMALL = dict(num_train_ids=8, num_val_ids=3, num_test_ids=4, images_per_id=2, img_height=64, img_width=32)


def load(root):
    with open(os.path.join(root, "SynthPEDES", "reid_raw.json")) as f:
        return json.load(f)


def pixels(root, annos):
    return [np.asarray(Image.open(os.path.join(root, "SynthPEDES", "imgs", a["file_path"]))) for a in annos]


def test_deterministic_by_seed(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    SynthPEDES(a, verbose=False, show_progress=False, seed=3, **SMALL)
    SynthPEDES(b, verbose=False, show_progress=False, seed=3, **SMALL)
    SynthPEDES(c, verbose=False, show_progress=False, seed=4, **SMALL)
    ja, jb, jc = load(a), load(b), load(c)
    assert ja == jb and ja != jc
    pa, pb, pc = pixels(a, ja), pixels(b, jb), pixels(c, jc)
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
    assert not all(np.array_equal(x, y) for x, y in zip(pa, pc))
    assert pa[0].shape == (64, 32, 3) and pa[0].dtype == np.uint8


def test_format_splits_and_captions(tmp_path):
    ds = SynthPEDES(str(tmp_path), verbose=False, show_progress=False, **SMALL)
    annos = load(tmp_path)
    assert len(annos) == (8 + 3 + 4) * 2
    for a in annos:
        assert set(a) >= {"split", "id", "file_path", "captions", "processed_tokens"}
        assert len(a["captions"]) == 2 and a["captions"][0] != a["captions"][1]
        assert os.path.isfile(os.path.join(tmp_path, "SynthPEDES", "imgs", a["file_path"]))
        attrs = a["attributes"]
        for cap in a["captions"]:
            words = cap.lower().replace(".", "").split()
            upper = attrs["upper_colour"]
            assert upper in words or (upper == "gray" and "grey" in words) or (upper == "purple" and "violet" in words)
            assert attrs["hair_length"] in words
    # parsed as CUHK-PEDES: train pids 0..N-1, eval pids = id; id sets disjoint across splits
    assert sorted(ds.train_id_container) == list(range(8))
    train_ids = {p + 1 for p in ds.train_id_container}
    assert len(ds.val_id_container) == 3 and len(ds.test_id_container) == 4
    assert not train_ids & ds.val_id_container and not train_ids & ds.test_id_container
    assert not ds.val_id_container & ds.test_id_container
    assert len(ds.train) == 8 * 2 * 2 and len(ds.test["img_paths"]) == 8 and len(ds.test["captions"]) == 16
    # identities are distinct attribute combinations, constant over an identity's images
    per_id = {}
    for a in annos:
        per_id.setdefault(a["id"], []).append(json.dumps(a["attributes"], sort_keys=True))
    assert all(len(set(v)) == 1 for v in per_id.values())
    assert len({v[0] for v in per_id.values()}) == len(per_id)


def test_garment_colours_visible(tmp_path):
    SynthPEDES(str(tmp_path), verbose=False, show_progress=False, seed=1,
               **{**SMALL, "num_train_ids": 20, "img_height": 128, "img_width": 64})
    annos = load(tmp_path)
    checked = 0
    for a, img in zip(annos, pixels(tmp_path, annos)):
        name = a["attributes"]["upper_colour"]
        if name in ("gray", "white", "black"):
            continue
        ref = np.array(GARMENT_COLOURS[name], dtype=np.int32)
        close = (np.abs(img.astype(np.int32) - ref).max(-1) < 60).mean()
        assert close > 0.04, (a["file_path"], name, close)
        checked += 1
    assert checked >= 10


def test_reused_and_regenerated_on_param_change(tmp_path, monkeypatch):
    SynthPEDES(str(tmp_path), verbose=False, show_progress=False, **SMALL)
    meta = json.load(open(tmp_path / "SynthPEDES" / "meta.json"))
    assert meta == {"generator_version": sp.GENERATOR_VERSION, "params": {**SMALL, "seed": 0}}

    def boom(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr(sp, "_write_dataset", boom)
    SynthPEDES(str(tmp_path), verbose=False, show_progress=False, **SMALL)  # reused
    monkeypatch.undo()
    ds = SynthPEDES(str(tmp_path), verbose=False, show_progress=False, **{**SMALL, "num_test_ids": 2})
    assert len(ds.test_id_container) == 2
    assert sorted(os.listdir(tmp_path)) == ["SynthPEDES"]  # no temp folders left behind


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = sp.render_person

    def dies(*a, **k):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sp, "render_person", dies)
    with pytest.raises(KeyboardInterrupt):
        SynthPEDES(str(tmp_path), verbose=False, show_progress=False, **SMALL)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    ds = SynthPEDES(str(tmp_path), verbose=False, show_progress=False, **SMALL)
    assert len(ds.train) == 32


def test_foreign_folder_and_bad_params(tmp_path):
    os.makedirs(tmp_path / "SynthPEDES" / "imgs")
    with pytest.raises(FileExistsError, match="has no meta.json"):
        SynthPEDES(str(tmp_path), verbose=False, show_progress=False, **SMALL)
    with pytest.raises(ValueError, match="num_train_ids must be >= 1"):
        SynthPEDES(str(tmp_path / "x"), num_train_ids=0)
    with pytest.raises(ValueError, match="identities requested"):
        SynthPEDES(str(tmp_path / "x"), num_train_ids=10 ** 7)


def test_registry_entry(tmp_path):
    ds = build_dataset("SynthPEDES", str(tmp_path), verbose=False, show_progress=False, **SMALL)
    assert isinstance(ds, SynthPEDES) and len(ds.train_id_container) == 8


def test_the_demo_generates_the_documented_dataset(tmp_path, monkeypatch):
    """``--dataset_name SynthPEDES`` with no size options (the demo) asks the generator for the set README's demo
    output shows: 240 / 40 / 80 train / val / test identities with 960 / 160 / 320 images of 128x64."""
    requested = []

    def record(out_dir, params, show_progress=True):
        requested.append(params)
        raise KeyboardInterrupt  # stop before drawing 1440 images

    monkeypatch.setattr(sp, "_write_dataset", record)
    with pytest.raises(KeyboardInterrupt):
        build_dataset("SynthPEDES", str(tmp_path), verbose=False)
    (p,) = requested
    ids_images = [(p[k], p[k] * p["images_per_id"]) for k in ("num_train_ids", "num_val_ids", "num_test_ids")]
    assert ids_images == [(240, 960), (40, 160), (80, 320)]  # README's table of the demo
    assert (p["img_height"], p["img_width"]) == (128, 64)
