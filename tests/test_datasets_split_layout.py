"""The per-split reid layout (``{split}_reid.json``, the layout TBPS-CLIP's loader reads) against the datasets' own
layout: the same generated data written in both gives the same splits; back-translations reach the augmentation;
malformed files are named; tools.check_dataset accepts it."""
import json
import logging
import os
import os.path as op
import re
import shutil

import pytest

from datasets.build import build_dataset, build_train_loader
from datasets.bases import DatasetFormatError
from datasets.synthpedes import _write_dataset, synth_params
from tools import check_dataset
from utils.options import default_args

from conftest import TINY_SYNTH

# name -> (the dataset's own annotation file, its image path key, the id of the first train identity)
OWN = {"CUHK-PEDES": ("reid_raw.json", "file_path", 1), "ICFG-PEDES": ("ICFG-PEDES.json", "file_path", 0),
       "RSTPReid": ("data_captions.json", "img_path", 0)}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A tiny SynthPEDES (8 train / 2 val / 4 test ids, 2 images each, 2 captions each): (folder, entries), the
    train entries given back-translations for every other caption (and one test entry one, which is not used)."""
    src = tmp_path_factory.mktemp("src")
    _write_dataset(str(src), synth_params(**TINY_SYNTH), show_progress=False)
    with open(src / "reid_raw.json") as f:
        annos = json.load(f)
    for i, a in enumerate(annos):
        if a["split"] == "train" and i % 3 != 2:  # some train entries have none
            a["captions_bt"] = [f"bt{i}.{j} " + c if (i + j) % 2 == 0 else "" for j, c in enumerate(a["captions"])]
    next(a for a in annos if a["split"] == "test")["captions_bt"] = ["x", "y"]
    return str(src), annos


def write_own(root, name, src, annos):
    """``<root>/<name>/{imgs/, <own annotation>}``: ids shifted so the first train id is the dataset's first."""
    file, key, first = OWN[name]
    d = op.join(root, name)
    shutil.copytree(op.join(src, "imgs"), op.join(d, "imgs"))
    out = []
    for a in annos:
        e = {k: v for k, v in a.items() if k not in ("file_path", "processed_tokens", "attributes")}
        out.append({**e, "id": a["id"] - 1 + first, key: a["file_path"]})
    with open(op.join(d, file), "w") as f:
        json.dump(out, f)
    return d


def write_split_files(root, name, src, annos, keep_split_key=False, splits=("train", "test", "val")):
    """``<root>/<name>/{imgs/, train_reid.json, test_reid.json, val_reid.json}``: entries {id, file_path, captions
    [, captions_bt]} (no 'split' key unless ``keep_split_key``), as TBPS-CLIP's files are."""
    first = OWN[name][2]
    d = op.join(root, name)
    shutil.copytree(op.join(src, "imgs"), op.join(d, "imgs"))
    for split in splits:
        entries = []
        for a in annos:
            if a["split"] != split:
                continue
            e = {"file_path": a["file_path"], "id": a["id"] - 1 + first, "captions": a["captions"]}
            if "captions_bt" in a:
                e["captions_bt"] = a["captions_bt"]
            if keep_split_key:
                e["split"] = split
            entries.append(e)
        with open(op.join(d, f"{split}_reid.json"), "w") as f:
            json.dump(entries, f)
    return d


def relative(ds, d):
    """The parsed splits with image paths relative to the dataset folder ``d``."""
    out = {"train": [(pid, iid, op.relpath(p, d), c) for pid, iid, p, c in ds.train],
           "train_captions_bt": ds.train_captions_bt, "train_ids": ds.train_id_container}
    for split in ("test", "val"):
        s = dict(getattr(ds, split))
        s["img_paths"] = [op.relpath(p, d) for p in s["img_paths"]]
        out[split] = s
        out[f"{split}_ids"] = getattr(ds, f"{split}_id_container")
    return out


@pytest.mark.parametrize("name", list(OWN))
@pytest.mark.parametrize("keep_split_key", [False, True])
def test_both_layouts_give_the_same_splits(tmp_path, generated, name, keep_split_key):
    src, annos = generated
    d_own = write_own(tmp_path / "own", name, src, annos)
    d_split = write_split_files(tmp_path / "split", name, src, annos, keep_split_key=keep_split_key)
    own = build_dataset(name, str(tmp_path / "own"), verbose=False)
    per_split = build_dataset(name, str(tmp_path / "split"), verbose=False)
    assert per_split.anno_paths == {s: op.join(d_split, f"{s}_reid.json") for s in ("train", "test", "val")}
    assert own.anno_paths == {s: op.join(d_own, OWN[name][0]) for s in ("train", "test", "val")}
    got, exp = relative(per_split, d_split), relative(own, d_own)
    assert got == exp
    # what the splits are: 8 contiguous train pids, 2 captions per image, raw eval ids, back-translations aligned
    assert sorted(got["train_ids"]) == list(range(8)) and len(got["train"]) == 8 * 2 * 2
    assert len(got["test"]["img_paths"]) == 4 * 2 and len(got["val"]["captions"]) == 2 * 2 * 2
    first = OWN[name][2]
    assert got["test_ids"] == {i - 1 + first for i in range(11, 15)}
    train = [a for a in annos if a["split"] == "train"]
    assert got["train_captions_bt"] == [(bt or None) for a in train
                                        for bt in a.get("captions_bt", [""] * len(a["captions"]))]
    assert sum(bt is not None for bt in got["train_captions_bt"]) > 0
    # TBPS-CLIP's loader numbers train identities by first appearance: the same pids on these files
    first_seen = {}
    for a in train:
        first_seen.setdefault(a["id"], len(first_seen))
    assert [row[0] for row in per_split.train] == [first_seen[a["id"]] for a in train for _ in a["captions"]]


def test_back_translations_reach_the_augmentation(tmp_path, generated):
    """--txt_aug_backtrans_prob 1: every train caption with a back-translation in train_reid.json is replaced by it."""
    src, annos = generated
    write_split_files(tmp_path, "CUHK-PEDES", src, annos)
    ds = build_dataset("CUHK-PEDES", str(tmp_path), verbose=False)
    args = default_args(dataset_name="CUHK-PEDES", root_dir=str(tmp_path), img_size=(64, 32), batch_size=4,
                        num_workers=0, txt_aug_backtrans_prob=1.0)
    train_set = build_train_loader(args, ds).dataset
    seen = [train_set.caption(i) for i in range(len(ds.train))]
    train = [a for a in annos if a["split"] == "train"]
    exp = [bt or c for a in train for c, bt in zip(a["captions"], a.get("captions_bt", [""] * len(a["captions"])))]
    assert seen == exp and any(s.startswith("bt") for s in seen) and any(not s.startswith("bt") for s in seen)


def test_without_val_file_val_is_empty(tmp_path, generated):
    src, annos = generated
    write_split_files(tmp_path, "ICFG-PEDES", src, annos, splits=("train", "test"))
    ds = build_dataset("ICFG-PEDES", str(tmp_path), verbose=False)
    assert set(ds.anno_paths) == {"train", "test"} and ds.val["img_paths"] == [] and ds.val_id_container == set()
    assert len(ds.test["img_paths"]) == 8


def test_own_file_wins_over_split_files_with_a_warning(tmp_path, generated, caplog):
    src, annos = generated
    d = write_own(tmp_path, "RSTPReid", src, annos)
    with open(op.join(d, "train_reid.json"), "w") as f:
        json.dump([], f)
    with caplog.at_level(logging.WARNING, logger="IRRA.dataset"):
        ds = build_dataset("RSTPReid", str(tmp_path), verbose=False)
    assert ds.anno_path == op.join(d, "data_captions.json") and len(ds.train) == 32
    assert "data_captions.json' is used; the per-split files" in caplog.text and "train_reid.json" in caplog.text


def _files(tmp_path, train=None, test=None):
    d = tmp_path / "CUHK-PEDES"
    os.makedirs(d / "imgs", exist_ok=True)
    for split, entries in (("train", train), ("test", test)):
        if entries is not None:
            with open(d / f"{split}_reid.json", "w") as f:
                json.dump(entries, f)
    return str(d)


def _e(**over):
    return {"id": 1, "file_path": "a.png", "captions": ["a man"], **over}


@pytest.mark.parametrize("train,test,file,msg", [
    ([_e(), _e(id=2, split="test")], [_e(id=9)], "train_reid.json",
     r"entry 1: key 'split' is 'test' in the file of the 'train' split"),
    ([_e()], [{"id": 9, "img_path": "t.png", "captions": ["x"]}], "test_reid.json",
     r"entry 0: missing key 'file_path' \(entries need \['id', 'file_path', 'captions'\]\)"),
    ([_e(), _e(id=2, captions_bt=["a", "b"])], [_e(id=9)], "train_reid.json",
     r"entry 1: key 'captions_bt' has 2 items but 'captions' has 1"),
    ([_e(), _e(id=3)], [_e(id=9)], "train_reid.json",
     r"train pids must be 0\.\.1 without gaps \(pid = id - 1\); id 2 \(pid 1\) is missing"),
    ({"0": _e()}, [_e(id=9)], "train_reid.json", r"expected a JSON list of entries, got dict"),
    ([_e(file_path="../a.png")], [_e(id=9)], "train_reid.json", r"entry 0: image path '\.\./a\.png' \('file_path'\)"),
])
def test_malformed_split_file_names_the_file_and_entry(tmp_path, train, test, file, msg):
    d = _files(tmp_path, train, test)
    with pytest.raises(DatasetFormatError, match=re.escape(op.join(d, file)) + ": .*" + msg):
        build_dataset("CUHK-PEDES", str(tmp_path), verbose=False)


def test_missing_test_file_is_named(tmp_path):
    d = _files(tmp_path, train=[_e()])
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("CUHK-PEDES", str(tmp_path), verbose=False)
    msg = str(e.value)
    assert f"'{op.join(d, 'test_reid.json')}' is not available (the per-split layout needs train_reid.json and " \
           f"test_reid.json)" in msg and "reid_raw.json" in msg


def test_check_dataset_accepts_the_split_layout(tmp_path, generated, capsys):
    src, annos = generated
    d = write_split_files(tmp_path, "RSTPReid", src, annos)
    code = check_dataset.main(["--dataset_name", "RSTPReid", "--root_dir", str(tmp_path), "--no_progress"])
    out = capsys.readouterr().out
    assert code == check_dataset.EXIT_OK, out
    files = ", ".join(op.join(d, f"{s}_reid.json") for s in ("train", "test", "val"))
    assert f"RSTPReid: {files}" in out
    assert "train: 8 ids, 16 images, 32 captions" in out and "test: 4 ids, 8 images, 16 captions" in out
    os.remove(op.join(d, "imgs", annos[0]["file_path"]))
    assert check_dataset.main(["--dataset_name", "RSTPReid", "--root_dir", str(tmp_path), "--no_progress"]) == \
        check_dataset.EXIT_BAD_IMAGES
