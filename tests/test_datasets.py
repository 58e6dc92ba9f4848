"""Parsers against tests/fixtures/datasets.json, error messages, registry, transforms, collate, build_dataloader."""
import argparse
import json
import logging
import os
import re
import os.path as op

import pytest

from utils.options import default_args
import torch
from PIL import Image

from datasets import build as dbuild
from datasets.bases import DatasetFormatError, ImageDataset, ImageTextDataset, ImageTextMLMDataset, TextDataset, tokenize
from datasets.build import build_dataloader, build_dataset, build_transforms, collate
from datasets.check import ImageFilesMissingError
from datasets.cuhkpedes import CUHKPEDES
from datasets.icfgpedes import ICFGPEDES
from datasets.rstpreid import RSTPReid
from utils.choices import DATASETS
from utils.simple_tokenizer import SimpleTokenizer

FIXTURE = op.join(op.dirname(__file__), "fixtures", "datasets.json")
with open(FIXTURE) as f:
    FIX = json.load(f)
PARSERS = {"CUHK-PEDES": CUHKPEDES, "ICFG-PEDES": ICFGPEDES, "RSTPReid": RSTPReid}


def write_dataset(root, name, data=None, file=None, imgs=True):
    d = op.join(root, name)
    os.makedirs(d, exist_ok=True)
    if imgs:
        os.makedirs(op.join(d, "imgs"), exist_ok=True)
    with open(op.join(d, file or FIX["annotations"][name]["file"]), "w") as f:
        json.dump(FIX["annotations"][name]["data"] if data is None else data, f)
    return d


def rel(paths, root):
    return [op.relpath(p, root) for p in paths]


@pytest.mark.parametrize("name", list(PARSERS))
def test_parsers_match_fixture(tmp_path, name):
    write_dataset(tmp_path, name)
    ds = PARSERS[name](root=str(tmp_path), verbose=False)
    exp = FIX["parsed"][name]
    got_train = [[pid, iid, op.relpath(p, tmp_path), cap] for pid, iid, p, cap in ds.train]
    assert got_train == exp["train"]
    assert len(ds.train_id_container) == exp["num_classes"]
    assert sorted(ds.train_id_container) == list(range(exp["num_classes"]))
    for split in ("test", "val"):
        got = getattr(ds, split)
        assert got["image_pids"] == exp[split]["image_pids"]
        assert rel(got["img_paths"], tmp_path) == exp[split]["img_paths"]
        assert got["caption_pids"] == exp[split]["caption_pids"]
        assert got["captions"] == exp[split]["captions"]
        assert getattr(ds, f"{split}_id_container") == set(exp[split]["image_pids"])


def test_every_valid_dataset_name_builds_its_parser(tmp_path):
    """Each name --dataset_name accepts (utils.choices.DATASETS) builds the parser of that dataset: the real ones
    parse their fixture annotation as expected, SynthPEDES generates and parses itself."""
    for name in DATASETS:
        if name == "SynthPEDES":
            tiny = dict(num_train_ids=2, num_val_ids=1, num_test_ids=1, images_per_id=1, img_height=32, img_width=16)
            ds = build_dataset(name, str(tmp_path), verbose=False, show_progress=False, **tiny)
            assert sorted(ds.train_id_container) == [0, 1] and len(ds.test["img_paths"]) == 1
            continue
        if name == "UFine6926":  # no original parse to compare with: a generated set in its layout (test_ufine6926.py)
            from tests.protocol_data import write_ufine6926
            write_ufine6926(str(tmp_path / "ufine"), num_train_ids=2, num_val_ids=1, num_test_ids=1, images_per_id=1)
            ds = build_dataset(name, str(tmp_path / "ufine"), verbose=False)
            assert sorted(ds.train_id_container) == [0, 1] and len(ds.test["img_paths"]) == 1
            continue
        assert name in FIX["annotations"], f"{name}: add its annotation and parsed splits to tests/fixtures/datasets.json"
        write_dataset(tmp_path, name)
        ds = build_dataset(name, str(tmp_path), verbose=False)
        assert [[pid, iid, op.relpath(p, tmp_path), cap] for pid, iid, p, cap in ds.train] == \
            FIX["parsed"][name]["train"], name
        assert ds.test["captions"] == FIX["parsed"][name]["test"]["captions"], name
    with pytest.raises(ValueError, match=r"--dataset_name 'CUHK': unknown; valid: .*CUHK-PEDES.*ICFG-PEDES.*RSTPReid.*SynthPEDES"):
        build_dataset("CUHK", str(tmp_path))


def test_icfg_accepts_underscore_file_name(tmp_path):
    write_dataset(tmp_path, "ICFG-PEDES", file="ICFG_PEDES.json")
    ds = ICFGPEDES(root=str(tmp_path), verbose=False)
    assert len(ds.train) == len(FIX["parsed"]["ICFG-PEDES"]["train"])


def test_show_dataset_info_logs_table(tmp_path, caplog):
    write_dataset(tmp_path, "RSTPReid")
    with caplog.at_level(logging.INFO, logger="IRRA.dataset"):
        RSTPReid(root=str(tmp_path), verbose=True)
    exp = FIX["parsed"]["RSTPReid"]
    rows = {}
    for ln in caplog.text.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("subset", "train", "test", "val"):
            rows[cells[0]] = cells[1:]
    assert rows["subset"] == ["ids", "images", "captions"]
    assert rows["train"] == [str(exp["num_classes"]), str(len({r[1] for r in exp["train"]})), str(len(exp["train"]))]
    for split in ("test", "val"):
        e = exp[split]
        assert rows[split] == [str(len(set(e["image_pids"]))), str(len(e["img_paths"])), str(len(e["captions"]))]


@pytest.mark.parametrize("name,url", [
    ("CUHK-PEDES", "https://github.com/ShuangLI59/Person-Search-with-Natural-Language-Description"),
    ("ICFG-PEDES", "https://github.com/zifyloo/SSAN"),
    ("RSTPReid", "https://github.com/NjtechCVLab/RSTPReid-Dataset")])
def test_missing_folder_prints_tree_and_source(tmp_path, name, url):
    with pytest.raises(FileNotFoundError) as e:
        PARSERS[name](root=str(tmp_path), verbose=False)
    msg = str(e.value)
    assert f"dataset folder '{op.join(tmp_path, name)}' is not available" in msg
    assert url in msg and "imgs/" in msg and FIX["annotations"][name]["file"] in msg


@pytest.mark.parametrize("encoding, found", [("utf-16", "UTF-16 LE (byte order mark FF FE)"),
                                             ("latin-1", "Latin-1 / Windows-1252")])
def test_annotation_in_another_encoding_names_the_file_and_the_encoding(tmp_path, encoding, found):
    d = write_dataset(tmp_path, "RSTPReid")
    anno = op.join(d, FIX["annotations"]["RSTPReid"]["file"])
    data = json.loads(json.dumps(FIX["annotations"]["RSTPReid"]["data"]))  # a copy
    data[0]["captions"][0] = "A woman in a café-coloured coat."
    with open(anno, "w", encoding=encoding) as f:
        json.dump(data, f, ensure_ascii=False)
    with pytest.raises(ValueError, match=rf"{re.escape(anno)}: the annotation file is .*{re.escape(found)}"):
        RSTPReid(root=str(tmp_path), verbose=False)


def test_missing_annotation_and_imgs(tmp_path):
    os.makedirs(tmp_path / "RSTPReid" / "imgs")
    with pytest.raises(FileNotFoundError, match=r"annotation file '.*data_captions.json' is not available"):
        RSTPReid(root=str(tmp_path), verbose=False)
    os.makedirs(tmp_path / "ICFG-PEDES")
    with pytest.raises(FileNotFoundError) as e:
        ICFGPEDES(root=str(tmp_path), verbose=False)
    assert "image folder" in str(e.value) and "ICFG-PEDES.json' or '" in str(e.value)
    assert "ICFG_PEDES.json" in str(e.value)


def _cuhk(**over):
    entry = {"split": "train", "id": 1, "file_path": "a.png", "captions": ["a man"]}
    entry.update(over)
    return entry


@pytest.mark.parametrize("bad,key,msg", [
    ({"drop": "captions"}, "captions", "missing key 'captions'"),
    ({"drop": "id"}, "id", "missing key 'id'"),
    ({"captions": []}, "captions", "key 'captions' must be a non-empty list"),
    ({"id": "x7"}, "id", "key 'id' must be an integer, got 'x7'"),
    ({"id": 1.5}, "id", "key 'id' must be an integer, got 1.5"),
    ({"captions": "a man"}, "captions", "key 'captions' must be a non-empty list"),
])
def test_malformed_entry_names_file_index_key(tmp_path, bad, key, msg):
    entry = _cuhk()
    if "drop" in bad:
        del entry[bad["drop"]]
    else:
        entry.update(bad)
    data = [_cuhk(), _cuhk(id=2, file_path="b.png"), entry]
    write_dataset(tmp_path, "CUHK-PEDES", data)
    with pytest.raises(DatasetFormatError) as e:
        CUHKPEDES(root=str(tmp_path), verbose=False)
    s = str(e.value)
    assert "reid_raw.json: entry 2:" in s and msg in s


def test_rstp_requires_img_path_key(tmp_path):
    write_dataset(tmp_path, "RSTPReid", [{"split": "train", "id": 0, "file_path": "a.jpg", "captions": ["x"]}])
    with pytest.raises(DatasetFormatError, match=r"data_captions.json: entry 0: missing key 'img_path'"):
        RSTPReid(root=str(tmp_path), verbose=False)


def test_train_pid_gap_names_first_offending_id(tmp_path):
    data = [_cuhk(id=1), _cuhk(id=2), _cuhk(id=4), _cuhk(id=5), _cuhk(split="test", id=9)]
    write_dataset(tmp_path, "CUHK-PEDES", data)
    with pytest.raises(DatasetFormatError, match=r"pids must be 0\.\.3 without gaps.*id 3 \(pid 2\) is missing, "
                                                 r"the next id is 4 \(pid 3\)"):
        CUHKPEDES(root=str(tmp_path), verbose=False)
    # CUHK ids are 1-based: an id 0 gives pid -1
    write_dataset(tmp_path, "CUHK-PEDES", [_cuhk(id=0), _cuhk(id=1)])
    with pytest.raises(DatasetFormatError, match=r"id 0 gives pid -1 < 0 \(ids start at 1\)"):
        CUHKPEDES(root=str(tmp_path), verbose=False)


def test_blank_captions_dropped_with_warning(tmp_path, caplog):
    data = [_cuhk(captions=["a man", "  ", ""]), _cuhk(id=2, captions=["\t", "red shirt"]),
            _cuhk(split="test", id=3, captions=["x", " "])]
    write_dataset(tmp_path, "CUHK-PEDES", data)
    with caplog.at_level(logging.WARNING, logger="IRRA.dataset"):
        ds = CUHKPEDES(root=str(tmp_path), verbose=False)
    assert "dropped 4 empty/whitespace-only captions" in caplog.text
    assert [r[3] for r in ds.train] == ["a man", "red shirt"] and [r[1] for r in ds.train] == [0, 1]
    assert ds.test["captions"] == ["x"]


# ------------------------------------------------------------------------------------------ transforms / collate
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def test_build_transforms_pipelines():
    import torchvision.transforms as T
    ev = build_transforms((48, 16), is_train=False)
    assert [type(t) for t in ev.transforms] == [T.Resize, T.ToTensor, T.Normalize]
    assert ev.transforms[0].size == (48, 16)
    assert ev.transforms[2].mean == MEAN and ev.transforms[2].std == STD
    tr = build_transforms((48, 16), aug=False, is_train=True)
    assert [type(t) for t in tr.transforms] == [T.Resize, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    aug = build_transforms((48, 16), aug=True, is_train=True)
    assert [type(t) for t in aug.transforms] == [T.Resize, T.RandomHorizontalFlip, T.Pad, T.RandomCrop, T.ToTensor,
                                                 T.Normalize, T.RandomErasing]
    assert aug.transforms[2].padding == 10 and aug.transforms[6].scale == (0.02, 0.4)
    assert list(aug.transforms[6].value) == list(MEAN)
    # a uniform image normalises to (v - mean) / std everywhere
    img = Image.new("RGB", (20, 60), (255, 0, 128))
    x = ev(img)
    assert x.shape == (3, 48, 16)
    want = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x[:, 10, 5], want, rtol=1e-5, atol=1e-5)
    for t in (tr, aug):
        assert t(img).shape == (3, 48, 16)


def test_collate_stacks_and_rejects_bad_input():
    batch = [{"pids": 1, "images": torch.zeros(3, 4, 2), "caption_ids": torch.arange(5)},
             {"pids": 2, "images": torch.ones(3, 4, 2), "caption_ids": torch.arange(5) + 1}]
    out = collate(batch)
    assert out["pids"].tolist() == [1, 2] and out["pids"].dtype == torch.long
    assert out["images"].shape == (2, 3, 4, 2) and out["caption_ids"][1, 0] == 1
    with pytest.raises(TypeError, match="expects a non-empty list of dicts"):
        collate([(1, torch.zeros(2))])
    with pytest.raises(TypeError, match="expects a non-empty list of dicts"):
        collate(torch.zeros(2))
    with pytest.raises(TypeError, match=r"unexpected data type \['Image'\] for key 'images'"):
        collate([{"images": Image.new("RGB", (2, 2))}])
    with pytest.raises(TypeError, match=r"key 'caption_ids'"):
        collate([{"pids": 1, "caption_ids": torch.zeros(2)}, {"pids": 2}])


# ------------------------------------------------------------------------------------------ datasets / loaders
def make_images(root, name, size=(16, 32)):
    """Write small PNGs for every image of the fixture dataset ``name`` under root."""
    ann = FIX["annotations"][name]
    key = "img_path" if name == "RSTPReid" else "file_path"
    for i, e in enumerate(ann["data"]):
        p = op.join(root, name, "imgs", e[key])
        os.makedirs(op.dirname(p), exist_ok=True)
        Image.new("RGB", size, (i * 9 % 256, 50, 200)).save(p)


def test_torch_datasets_items(tmp_path):
    write_dataset(tmp_path, "CUHK-PEDES")
    make_images(tmp_path, "CUHK-PEDES")
    ds = CUHKPEDES(root=str(tmp_path), verbose=False)
    tok = SimpleTokenizer()
    tf = build_transforms((32, 16), is_train=False)
    train = ImageTextDataset(ds.train, tf, text_length=24, tokenizer=tok)
    item = train[3]
    pid, iid, _, cap = ds.train[3]
    assert item["pids"] == pid and item["image_ids"] == iid and item["images"].shape == (3, 32, 16)
    assert torch.equal(item["caption_ids"], tokenize(cap, tok, 24))
    assert item["caption_ids"].dtype == torch.long
    item["caption_ids"][1] = 0  # callers get a copy: the cache stays clean
    assert torch.equal(train[3]["caption_ids"], tokenize(cap, tok, 24))
    img = ImageDataset(ds.test["image_pids"], ds.test["img_paths"], tf)
    assert len(img) == len(ds.test["img_paths"]) and img[1][0] == ds.test["image_pids"][1]
    txt = TextDataset(ds.test["caption_pids"], ds.test["captions"], text_length=77, tokenizer=tok)
    p, ids = txt[2]
    assert p == ds.test["caption_pids"][2] and torch.equal(ids, tokenize(ds.test["captions"][2], tok, 77))


def test_missing_images_reported_when_dataset_built(tmp_path):
    write_dataset(tmp_path, "CUHK-PEDES")  # empty imgs/
    ds = CUHKPEDES(root=str(tmp_path), verbose=False)
    n_imgs = len({r[2] for r in ds.train})
    with pytest.raises(FileNotFoundError, match=rf"{n_imgs} of {n_imgs} image files of the train set cannot be read:"
                                                r"\n  .*0004001.png: missing\n") as err:
        ImageTextDataset(ds.train)
    assert isinstance(err.value, ImageFilesMissingError) and "runs even with --skip_image_check" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"of the evaluation set cannot be read"):
        ImageDataset(ds.test["image_pids"], ds.test["img_paths"])


def make_args(root, **over):
    a = dict(dataset_name="RSTPReid", root_dir=str(root), training=True, MLM=False, sampler="random",
             num_instance=2, batch_size=4, test_batch_size=3, num_workers=0, img_size=(32, 16), img_aug=False,
             text_length=77, val_dataset="test", masked_token_rate=0.8, masked_token_unchanged_rate=0.1)
    a.update(over)
    return default_args(**a)


def test_build_dataloader_modes(tmp_path):
    write_dataset(tmp_path, "RSTPReid")
    make_images(tmp_path, "RSTPReid")
    exp = FIX["parsed"]["RSTPReid"]
    tl, vi, vt, nc = build_dataloader(make_args(tmp_path, MLM=True))
    assert nc == exp["num_classes"]
    b = next(iter(tl))
    assert set(b) == {"pids", "image_ids", "images", "caption_ids", "mlm_ids", "mlm_labels"}
    assert b["images"].shape == (4, 3, 32, 16) and b["caption_ids"].shape == (4, 77)
    assert len(tl) == -(-len(exp["train"]) // 4) and tl.train_sampler is tl.sampler
    assert vi.batch_size == 3 and vt.batch_size == 3
    assert [int(p) for _, p in zip(range(4), vi.dataset.image_pids)] == exp["test"]["image_pids"][:4]
    pids = torch.cat([p for p, _ in vt])
    assert pids.tolist() == exp["test"]["caption_pids"]  # shuffle=False
    _, vi2, vt2, _ = build_dataloader(make_args(tmp_path, val_dataset="val"))
    assert vi2.dataset.image_pids == exp["val"]["image_pids"] and vt2.dataset.captions == exp["val"]["captions"]
    ti, tt, nc = build_dataloader(make_args(tmp_path, training=False))
    assert nc == exp["num_classes"] and tt.dataset.captions == exp["test"]["captions"]
    pid, imgs = next(iter(ti))
    assert imgs.shape == (3, 3, 32, 16) and pid.tolist() == exp["test"]["image_pids"][:3]


def test_build_dataloader_identity_and_bad_options(tmp_path):
    write_dataset(tmp_path, "RSTPReid")
    make_images(tmp_path, "RSTPReid")
    tl, _, _, _ = build_dataloader(make_args(tmp_path, sampler="identity", batch_size=4, num_instance=2))
    for b in tl:
        pids = b["pids"].tolist()
        assert len(pids) == 4 and pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]
    for option, value in (("sampler", "ident"), ("val_dataset", "dev"), ("dataset_name", "nope")):
        with pytest.raises(ValueError, match=rf"--{option} '{value}': unknown; valid: \["):
            make_args(tmp_path, **{option: value})  # the options refuse it
        args = make_args(tmp_path)
        args = args.replace(**{option: value})  # and so does build_dataloader, given options changed unchecked
        with pytest.raises(ValueError, match=rf"--{option} '{value}': unknown; valid: \["):
            build_dataloader(args)
    with pytest.raises(ValueError, match=r"--batch_size 5 must be a positive multiple of num_instance \(2\)"):
        build_dataloader(make_args(tmp_path, sampler="identity", batch_size=5))


@pytest.mark.parametrize("sampler", ["identity", "random"])
def test_ranks_and_workers_rebuild_the_one_process_batches(tmp_path, sampler):
    """DDP without processes: rank r's loader yields slice r of every one-process global batch, tensor for tensor
    (images with their random flips, MLM masks), with 0 or 2 loader workers alike."""
    write_dataset(tmp_path, "RSTPReid")
    make_images(tmp_path, "RSTPReid")
    ds = build_dataset("RSTPReid", str(tmp_path), verbose=False)
    args = make_args(tmp_path, sampler=sampler, batch_size=4, num_instance=2, seed=5, MLM=True)

    def epoch_batches(rank, world, workers):
        tl = dbuild.build_train_loader(args.replace(num_workers=workers), ds, rank=rank, world_size=world)
        dbuild.set_train_epoch(tl, 2)
        return list(tl)

    one = epoch_batches(0, 1, 0)
    assert one and all(bool(b["images"].abs().sum() > 0) for b in one)  # real pixels: the equalities below mean something
    again = epoch_batches(0, 1, 0)  # a rebuilt loader repeats the epoch exactly
    assert len(again) == len(one) and all(torch.equal(a[k], b[k]) for a, b in zip(one, again) for k in b)
    for workers in (0, 2):
        ranks = [epoch_batches(r, 2, workers) for r in range(2)]
        full = [b for b in one if b["pids"].numel() == args.batch_size]  # DDP drops the last partial batch
        assert len(ranks[0]) == len(ranks[1]) == len(full)
        for b, glob in enumerate(full):
            for key, value in glob.items():
                assert torch.equal(torch.cat([ranks[0][b][key], ranks[1][b][key]]), value), (workers, b, key)
    with pytest.raises(ValueError, match=r"multiple of num_instance \(2\) x world size \(2\)"):
        dbuild.build_train_loader(make_args(tmp_path, sampler="identity", batch_size=6, num_instance=2), ds,
                                  rank=0, world_size=2)


def test_same_sample_same_epoch_same_augmentation(tmp_path):
    """A sample's flip / crop / erasing and MLM mask depend on (seed, epoch, index) only, not on the order or the
    process that draws it; another epoch or seed draws anew."""
    write_dataset(tmp_path, "RSTPReid")
    make_images(tmp_path, "RSTPReid")
    ds = build_dataset("RSTPReid", str(tmp_path), verbose=False)
    tf = dbuild.build_transforms((32, 16), aug=True, is_train=True)
    def sample(i, epoch=1, seed=0):
        d = ImageTextMLMDataset(ds.train, tf, seed=seed)
        d.set_epoch(epoch)
        return d[i]
    a, b = sample(3), sample(3)
    torch.manual_seed(123)  # the global RNG does not matter
    c = sample(3)
    for k in ("images", "mlm_ids", "mlm_labels"):
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    assert not all(torch.equal(sample(i, epoch=e)["images"], sample(i, epoch=1)["images"])
                   for i in range(4) for e in (2, 3))
    assert not all(torch.equal(sample(i, seed=9)["mlm_ids"], sample(i)["mlm_ids"]) for i in range(4))


def test_entry_left_without_captions_is_dropped(tmp_path, caplog):
    """An image whose captions are all blank adds no identity and no image (it has no text to train on)."""
    data = [_cuhk(captions=["a man"]), _cuhk(id=2, file_path="b.png", captions=["  ", ""]),
            _cuhk(split="test", id=3, captions=["x"])]
    write_dataset(tmp_path, "CUHK-PEDES", data)
    with caplog.at_level(logging.WARNING, logger="IRRA.dataset"):
        ds = CUHKPEDES(root=str(tmp_path), verbose=False)
    assert "dropped 2 empty/whitespace-only captions (1 entries left without any caption were dropped too)" in caplog.text
    assert ds.train_id_container == {0} and len(ds.train_annos) == 1
