"""Nothing silently wrong: bad inputs give a clear error and lose nothing already written (part-level checks; the
end-to-end runs are in tests/test_bad_inputs_runs.py).

NaN similarities / features, YAML values of the wrong type, the image check wired into build_dataloader, checkpoint
saves refused (non-finite parameters) or cut short (disk full), stale temporary files, checkpoint file modes and
annotation files with a UTF-8 byte order mark.
"""
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import datasets.check as dcheck
from datasets import build as dbuild
from processor.processor import save_checkpoint
from tests.conftest import tiny_train_argv
from utils.checkpoint import Checkpointer
from utils.metrics import Evaluator, rank, rank_from_features
from datasets.cuhkpedes import CUHKPEDES
from datasets.icfgpedes import ICFGPEDES
from datasets.rstpreid import RSTPReid
from utils.options import get_args, load_config_args

with open(os.path.join(os.path.dirname(__file__), "fixtures", "datasets.json")) as _f:
    FIX = json.load(_f)  # annotation files of each dataset and their expected parse
PARSERS = {"CUHK-PEDES": CUHKPEDES, "ICFG-PEDES": ICFGPEDES, "RSTPReid": RSTPReid}


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------------------------------------------------ 1. NaN features
def test_rank_refuses_an_all_nan_similarity_matrix():
    sim = torch.full((3, 5), float("nan"))
    with pytest.raises(FloatingPointError, match=r"rank: the similarity matrix: 3 of 3 rows of a chunk hold NaN/inf "
                                                 r"values \(first row 0 of 3\)"):
        rank(sim, torch.arange(3), torch.arange(5))


@pytest.mark.parametrize("get_mAP", [True, False])
def test_rank_checks_every_chunk(get_mAP):
    """The finiteness check runs per chunk (no whole-matrix temporary): a NaN in the last chunk only is found, named
    by its row in the whole matrix; an inf too."""
    for bad_value in (float("nan"), float("inf")):
        sim = torch.randn(10, 6)
        sim[9, 4] = bad_value
        with pytest.raises(FloatingPointError, match=r"1 of \d rows of a chunk hold NaN/inf values \(first row 9 of 10\)"):
            rank(sim, torch.arange(10) % 6, torch.arange(6), get_mAP=get_mAP, chunk_size=3)
    rank(torch.randn(10, 6), torch.arange(10) % 6, torch.arange(6), get_mAP=get_mAP, chunk_size=3)  # finite: fine


def test_rank_from_features_refuses_nan_features():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    q[2, 5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"the query features: 1 of 4 rows .*\(first row 2\)"):
        rank_from_features(q, gal, torch.arange(4), torch.arange(6))
    gal[1, 0], gal[4, 7] = float("inf"), float("nan")
    with pytest.raises(FloatingPointError, match=r"the gallery features: 2 of 6 rows .*\(first row 1\)"):
        rank_from_features(q.nan_to_num(), gal, torch.arange(4), torch.arange(6))


class NanImageModel(nn.Module):
    """encode_text: a linear map; encode_image: a linear map whose output rows ``nan_rows`` are NaN."""

    def __init__(self, nan_rows):
        super().__init__()
        self.t, self.i = nn.Linear(6, 8), nn.Linear(12, 8)
        self.nan_rows = nan_rows
        self.seen = 0

    def encode_text(self, x):
        return self.t(x)

    def encode_image(self, x):
        out = self.i(x.flatten(1))  # [B, 3, 2, 2] -> [B, 12] -> [B, 8]
        for r in range(out.shape[0]):
            if self.seen + r in self.nan_rows:
                out[r] = float("nan")
        self.seen += out.shape[0]
        return out


def test_evaluator_names_the_split_and_the_rows():
    g = torch.Generator().manual_seed(1)
    imgs = TensorDataset(torch.arange(7) % 3, torch.randn(7, 3, 2, 2, generator=g))
    txts = TensorDataset(torch.arange(5) % 3, torch.randn(5, 6, generator=g))
    ev = Evaluator(DataLoader(imgs, batch_size=3), DataLoader(txts, batch_size=2), split="val")
    with pytest.raises(FloatingPointError, match=r"^val split: image gallery features: 2 of 7 rows hold NaN/inf "
                                                 r"values \(first row 1\)"):
        ev.eval(NanImageModel(nan_rows={1, 5}))
    assert set(ev.eval(NanImageModel(nan_rows=set()))) == {"R1", "R5", "R10", "mAP", "mINP"}  # finite: fine


def tiny_ckpt_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_checkpoint_with_nonfinite_parameters_is_refused_and_the_old_one_kept(tmp_path):
    model = tiny_ckpt_model()
    ck = Checkpointer(model, save_dir=str(tmp_path))
    save_checkpoint(ck, model, "best", epoch=1)
    before = sha256(tmp_path / "best.pth")
    with torch.no_grad():
        model[1].bias[0] = float("inf")
        model[0].weight[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"2 parameter tensor\(s\) hold NaN/inf \(e\.g\. \['0\.weight', "
                                                 r"'1\.bias'\]\): best\.pth was not written"):
        save_checkpoint(ck, model, "best", epoch=2)
    assert sha256(tmp_path / "best.pth") == before
    assert torch.load(tmp_path / "best.pth", weights_only=True)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["best.pth"]


# ------------------------------------------------------------------------------------------------ 2. YAML types
def write_yaml(path, text):
    path.write_text(text)
    return str(path)


def test_yaml_strings_become_booleans_and_numbers(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", 'MLM: "false"\nimg_aug: "false"\nloss_names: sdm+id\nlr: 1e-5\n')
    assert yaml.safe_load(open(cfg))["lr"] == "1e-5"  # YAML 1.1 reads 1e-5 (no dot) as a string
    args = get_args(["--config", cfg])
    assert args.MLM is False and args.img_aug is False and args.loss_names == "sdm+id"
    assert isinstance(args.lr, float) and args.lr == 1e-05
    cfg = write_yaml(tmp_path / "t.yaml", 'MLM: "True"\nimg_aug: "true"\nloss_names: sdm+id\n')
    args = get_args(["--config", cfg])
    assert args.MLM is True and args.img_aug is True and args.loss_names == "sdm+id+mlm"


def test_option_on_by_default_turns_off_from_yaml_and_command_line(tmp_path):
    """merge_param_groups defaults to true: YAML false / "false" and --no-merge_param_groups turn it off; the command
    line wins over the YAML."""
    assert get_args([]).merge_param_groups is True
    for text in ("merge_param_groups: false\n", 'merge_param_groups: "false"\n'):
        cfg = write_yaml(tmp_path / "m.yaml", text)
        assert get_args(["--config", cfg]).merge_param_groups is False
        assert get_args(["--config", cfg, "--merge_param_groups"]).merge_param_groups is True
    assert get_args(["--no-merge_param_groups"]).merge_param_groups is False
    cfg = write_yaml(tmp_path / "b.yaml", "merge_param_groups: sometimes\n")
    with pytest.raises(ValueError, match=r"option 'merge_param_groups' expects true or false, got 'sometimes'"):
        get_args(["--config", cfg])


@pytest.mark.parametrize("line, pattern", [
    ("img_size: 384", r"option 'img_size' expects a list \[H, W\], got 384"),
    ("num_epoch: 2.5", r"option 'num_epoch' expects int, got 2\.5"),
    ("loss_names: [sdm]", r"option 'loss_names' expects str, got \['sdm'\]"),
    ("MLM: maybe", r"option 'MLM' expects true or false, got 'maybe'"),
])
def test_yaml_values_that_do_not_fit_name_the_option(tmp_path, line, pattern):
    cfg = write_yaml(tmp_path / "c.yaml", line + "\n")
    with pytest.raises(ValueError, match=rf"--config {re.escape(cfg)}: {pattern}"):
        get_args(["--config", cfg])
    # the same value in a run's configs.yaml (test.py / visualize.py read it with load_config_args)
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    saved = yaml.safe_load(open(save_run_config(run_dir)))
    saved.update(yaml.safe_load(line))
    (run_dir / "configs.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match=rf"configs\.yaml: {pattern}"):
        load_config_args(str(run_dir))


def save_run_config(run_dir):
    """configs.yaml as a training run writes it (utils.iotools.save_train_configs of the parsed options)."""
    from utils.iotools import save_train_configs
    return save_train_configs(str(run_dir), get_args(tiny_train_argv("data", "logs")))


def test_run_config_with_string_booleans_loads(tmp_path):
    saved = yaml.safe_load(open(save_run_config(tmp_path)))
    saved.update(MLM="false", img_aug="true", loss_names="sdm+id", lr="1e-5")
    (tmp_path / "configs.yaml").write_text(yaml.safe_dump(saved))
    args = load_config_args(str(tmp_path / "configs.yaml"))
    assert args.MLM is False and args.img_aug is True and args.loss_names == "sdm+id"
    assert isinstance(args.lr, float) and args.lr == 1e-05


def test_stop_epoch_zero_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"--stop_epoch 0: expected >= 1"):
        get_args(tiny_train_argv("data", str(tmp_path / "logs"), "--stop_epoch", "0"))


# ------------------------------------------------------------------------------------------------ 3. image check
@pytest.fixture
def tiny_copy(tiny_cuhk_root, tmp_path):
    """A private copy of the tiny dataset (without the shared image-check cache)."""
    root = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_cuhk_root, "CUHK-PEDES"), root / "CUHK-PEDES",
                    ignore=shutil.ignore_patterns(dcheck.IMAGE_CHECK_DIR))
    return str(root)


def count_opens(monkeypatch):
    opened = []
    real_open = dcheck._open

    def spy(path, level):
        opened.append(path)
        return real_open(path, level)

    monkeypatch.setattr(dcheck, "_open", spy)
    return opened


def test_build_dataloader_checks_the_used_splits_then_uses_the_cache(tiny_copy, tmp_path, monkeypatch):
    opened = count_opens(monkeypatch)
    args = get_args(tiny_train_argv(tiny_copy, str(tmp_path / "logs")))
    dbuild.build_dataloader(args)
    ds = dbuild.build_dataset("CUHK-PEDES", root=tiny_copy, verbose=False)
    want = {p for _, _, p, _ in ds.train} | set(ds.test["img_paths"])  # train + --val_dataset test, not val
    assert sorted(opened) == sorted(want)
    opened.clear()
    dbuild.build_dataloader(args)  # unchanged files: nothing is opened again
    assert opened == []
    args = args.replace(training=False)  # test mode checks the test split only (cached too)
    dbuild.build_dataloader(args)
    assert opened == []
    args = args.replace(training=True, val_dataset="val")
    dbuild.build_dataloader(args)
    assert sorted(opened) == sorted(set(ds.val["img_paths"]))


def corrupt(path, seed=0):
    data = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    with open(path, "wb") as f:
        f.write(bytes(data.tolist()))


def test_a_corrupt_image_stops_build_dataloader_unless_skipped(tiny_copy, tmp_path, monkeypatch):
    ds = dbuild.build_dataset("CUHK-PEDES", root=tiny_copy, verbose=False)
    bad = ds.test["img_paths"][3]
    corrupt(bad)
    args = get_args(tiny_train_argv(tiny_copy, str(tmp_path / "logs")))
    for training in (True, False):
        args = args.replace(training=training)
        with pytest.raises(dcheck.ImageCheckError) as err:
            dbuild.build_dataloader(args)
        assert f"{bad}: unreadable" in str(err.value) and "--skip_image_check" in str(err.value)
    opened = count_opens(monkeypatch)
    args = args.replace(skip_image_check=True)
    args = args.replace(training=True)
    train_loader, img_loader, _, _ = dbuild.build_dataloader(args)
    assert opened == [] and bad in img_loader.dataset.img_paths  # not checked: the loaders are built as before
    # the exists level of the same check still runs under --skip_image_check, with its own error type
    os.remove(bad)
    with pytest.raises(dcheck.ImageFilesMissingError, match=rf"{re.escape(bad)}: missing") as err:
        dbuild.build_dataloader(args)
    assert isinstance(err.value, FileNotFoundError) and opened == []


def test_progress_bar_on_rank_0_only(tiny_copy, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dbuild, "check_dataset_images", lambda dataset, **kw: calls.append(kw))
    args = get_args(tiny_train_argv(tiny_copy, str(tmp_path / "logs")))
    dbuild.build_dataloader(args)
    monkeypatch.setattr(dbuild, "is_main_process", lambda: False)
    dbuild.build_dataloader(args)
    assert [c["show_progress"] for c in calls] == [True, False]
    assert [tuple(c["splits"]) for c in calls] == [("train", "test")] * 2


def test_read_image_retries_are_kept(tmp_path, monkeypatch):
    from utils import iotools
    p = tmp_path / "x.png"
    corrupt(p)
    monkeypatch.setattr(iotools.time, "sleep", lambda s: None)
    with pytest.raises(OSError, match=rf"Could not read image '{p}' after 3 attempts"):
        iotools.read_image(str(p))


# ------------------------------------------------------------------------------------------------ 5. disk full
class ShortDisk:
    """A binary file whose writes fail with ENOSPC once ``room`` bytes were written."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(memoryview(data)[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import utils.checkpoint as uc
    model = tiny_ckpt_model()
    ck = Checkpointer(model, save_dir=str(tmp_path))
    ck.save("best", epoch=1)
    before = sha256(tmp_path / "best.pth")
    real_fdopen = uc.os.fdopen
    monkeypatch.setattr(uc.os, "fdopen", lambda fd, *a, **k: ShortDisk(real_fdopen(fd, *a, **k), room=200))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OSError) as err:
        ck.save("best", epoch=2)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert str(err.value).startswith(f"[Errno {errno.ENOSPC}] No space left on device while writing "
                                     f"{tmp_path / 'best.pth'}")
    assert sha256(tmp_path / "best.pth") == before
    assert os.listdir(tmp_path) == ["best.pth"]  # no .best.*.tmp left


# ------------------------------------------------------------------------------------------------ 8./9. leftovers
def test_a_stale_tmp_of_a_killed_save_is_removed(tmp_path):
    """Temporary files are named .<file>.<pid>.<random>.tmp: those of a writer that is gone are removed by the next
    save of the same file; a live writer's are never touched."""
    model = tiny_ckpt_model()
    ck = Checkpointer(model, save_dir=str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is no live process now
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for stale in (f".last.pth.{dead.pid}.k1ll3d.tmp", f".best.pth.{dead.pid}.other.tmp",
                      f".last.pth.{live.pid}.writing.tmp"):
            (tmp_path / stale).write_bytes(b"half a checkpoint")
        ck.save("last", epoch=1)
        # only last's leftovers are its own, and the live writer's file stays
        assert sorted(os.listdir(tmp_path)) == [f".best.pth.{dead.pid}.other.tmp",
                                                f".last.pth.{live.pid}.writing.tmp", "last.pth"]
        ck.save("best", epoch=1)
        assert sorted(os.listdir(tmp_path)) == [f".last.pth.{live.pid}.writing.tmp", "best.pth", "last.pth"]
    finally:
        live.kill()
        live.wait()


def test_checkpoints_get_the_mode_of_the_other_run_files(tmp_path):
    old = os.umask(0o027)
    try:
        with open(tmp_path / "configs.yaml", "w") as f:
            f.write("x: 1\n")
        path = Checkpointer(tiny_ckpt_model(), save_dir=str(tmp_path)).save("best")
    finally:
        os.umask(old)
    want = os.stat(tmp_path / "configs.yaml").st_mode & 0o777
    assert want == 0o640
    assert os.stat(path).st_mode & 0o777 == want


# ------------------------------------------------------------------------------------------------ 9. UTF-8 BOM
@pytest.mark.parametrize("name", list(PARSERS))
def test_annotation_file_with_a_utf8_bom_is_read(tmp_path, name):
    d = tmp_path / name
    os.makedirs(d / "imgs")
    text = json.dumps(FIX["annotations"][name]["data"], ensure_ascii=False)
    (d / FIX["annotations"][name]["file"]).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    ds = PARSERS[name](root=str(tmp_path), verbose=False)
    exp = FIX["parsed"][name]
    assert [[pid, iid, os.path.relpath(p, tmp_path), cap] for pid, iid, p, cap in ds.train] == exp["train"]
    for split in ("test", "val"):
        assert [os.path.relpath(p, tmp_path) for p in getattr(ds, split)["img_paths"]] == exp[split]["img_paths"]
        assert getattr(ds, split)["captions"] == exp[split]["captions"]


def test_synthpedes_annotation_with_a_bom_is_read(tiny_copy):
    """The generated dataset's reid_raw.json (parsed as CUHK-PEDES) with a BOM gives the same parse."""
    anno = os.path.join(tiny_copy, "CUHK-PEDES", "reid_raw.json")
    plain = dbuild.build_dataset("CUHK-PEDES", root=tiny_copy, verbose=False)
    with open(anno, "rb") as f:
        data = f.read()
    with open(anno, "wb") as f:
        f.write(b"\xef\xbb\xbf" + data)
    bom = dbuild.build_dataset("CUHK-PEDES", root=tiny_copy, verbose=False)
    assert bom.train == plain.train and bom.test == plain.test and bom.val == plain.val



# ------------------------------------------------------------------------------------------------ 6. image grid
@pytest.mark.parametrize("arch, trained, ok, bad, implied", [
    ("scratch:ViT-Micro", (64, 32), [(64, 32), (72, 40)], (384, 128), "24x8 grid of 192"),  # (72-16)//16+1 = 4
    ("scratch:RN-Tiny", (64, 32), [(64, 32), (95, 63)], (384, 128), "12x4 grid of 48"),  # ResNet: H//32 x W//32
])
def test_check_image_grid(arch, trained, ok, bad, implied):
    from model.clip_model import build_CLIP_from_openai_pretrained
    from model.pretrained import check_image_grid
    clip, _ = build_CLIP_from_openai_pretrained(arch, trained, 16)
    sd = clip.state_dict()
    for img_size in ok:  # the same grid: fine
        check_image_grid(sd, img_size, 16, source="w.pth", config="c.yaml")
    with pytest.raises(ValueError, match=rf"^c\.yaml does not fit w\.pth: .* grid of {4 * 2 if 'ViT' in arch else 2} "
                                         rf"patch positions, .*img_size 384x128.* implies a {implied} positions"):
        check_image_grid(sd, bad, 16, source="w.pth", config="c.yaml")


def test_rank_accepts_huge_finite_values_whose_sum_overflows():
    """The per-chunk check sums the chunk first: a sum that overflows (finite values near the float32 maximum) takes
    the exact look and passes."""
    sim = torch.full((4, 3), 3.0e38)
    sim[:, 0] = 1.0
    cmc, mAP, mINP, _ = rank(sim, torch.tensor([1, 1, 2, 2]), torch.tensor([0, 1, 2]), chunk_size=2)
    assert torch.isfinite(cmc).all() and torch.isfinite(mAP)
    sim[3, 2] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"first row 3 of 4"):
        rank(sim, torch.tensor([1, 1, 2, 2]), torch.tensor([0, 1, 2]), chunk_size=2)
