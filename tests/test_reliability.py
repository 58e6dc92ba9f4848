"""Issue 18 §1, §6, §7, §9: containment of image paths and run names, surprising but valid data (16-bit and
EXIF-rotated images, huge images, ids, split names, empty captions, 40,000-letter words), option values that make no
sense, messages that name the right option, and entry points that end expected errors with one message."""
import json
import os
import os.path as op
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import utils.options as options_module
from datasets import check as dcheck
from tools import check_dataset as tcheck
from datasets.bases import DatasetFormatError, ImageDataset
from search.gallery import ImageFileDataset
from datasets.cuhkpedes import CUHKPEDES
from datasets.synthpedes import _write_dataset, synth_params
from utils import cli
from utils.iotools import check_output_dir, open_image
from utils.options import default_args
from utils.simple_tokenizer import MAX_BPE_WORD, get_tokenizer, tokenize

REPO = op.dirname(op.dirname(op.abspath(__file__)))


def write_cuhk(root, entries, images=("a.png",)):
    """``<root>/CUHK-PEDES/{imgs/<images>, reid_raw.json}``; returns the annotation path."""
    d = op.join(root, "CUHK-PEDES")
    os.makedirs(op.join(d, "imgs"), exist_ok=True)
    for name in images:
        Image.new("RGB", (16, 32), (10, 20, 30)).save(op.join(d, "imgs", name))
    path = op.join(d, "reid_raw.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


def entry(**over):
    e = {"split": "train", "id": 1, "file_path": "a.png", "captions": ["a man"]}
    e.update(over)
    return e


def run_py(*args, env=None, cwd=REPO, timeout=300):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop(cli.DEBUG_ENV, None) if env is None or cli.DEBUG_ENV not in env else None
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=full_env,
                          timeout=timeout)


# ------------------------------------------------------------------------------------- §1 containment: image paths
@pytest.mark.parametrize("path", ["/tmp/x.png", "/etc/passwd", "../../x.png", "sub/../../x.png", "..", "a/../../b"])
def test_image_path_outside_imgs_is_refused_at_parse_time(tmp_path, path):
    anno = write_cuhk(tmp_path, [entry(), entry(id=2, file_path=path)])
    with pytest.raises(DatasetFormatError) as err:
        CUHKPEDES(root=str(tmp_path), verbose=False)
    msg = str(err.value)
    assert anno in msg and "entry 1" in msg and repr(path) in msg and "outside the image folder" in msg


def test_dataset_check_refuses_an_image_path_outside_imgs(tmp_path):
    anno = write_cuhk(tmp_path, [entry(), entry(id=2, file_path="../../../etc/passwd")])
    r = run_py("-m", "tools.check_dataset", "--dataset_name", "CUHK-PEDES", "--root_dir", str(tmp_path), "--no_progress")
    assert r.returncode == tcheck.EXIT_BAD_DATASET, r.stdout + r.stderr
    assert anno in r.stderr and "entry 1" in r.stderr and "../../../etc/passwd" in r.stderr
    assert "Traceback" not in r.stderr


def test_image_paths_inside_imgs_and_symlinks_are_followed(tmp_path):
    """A sub-folder path and a symlink inside imgs/ (pointing elsewhere: the user's choice) are accepted."""
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (16, 32)).save(outside)
    write_cuhk(tmp_path, [entry(), entry(id=2, file_path="sub/./b.png"), entry(id=3, file_path="link.png")])
    imgs = tmp_path / "CUHK-PEDES" / "imgs"
    os.makedirs(imgs / "sub")
    Image.new("RGB", (16, 32)).save(imgs / "sub" / "b.png")
    os.symlink(outside, imgs / "link.png")
    ds = CUHKPEDES(root=str(tmp_path), verbose=False)
    assert [op.basename(r[2]) for r in ds.train] == ["a.png", "b.png", "link.png"]
    dcheck.check_dataset_images(ds, show_progress=False, cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------ §1 containment: --name
@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", ".hidden", ".", "a\\b", "x/../y", "a..b", "a\nb"])
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ValueError, match=r"^--name .*expected a plain folder name"):
        default_args(name=name)


def test_run_name_refused_before_anything_is_written(tiny_cuhk_root, tmp_path):
    from conftest import tiny_train_argv

    logs = tmp_path / "logs"
    r = run_py("train.py", *tiny_train_argv(tiny_cuhk_root, str(logs), "--name", "../../escaped"))
    assert r.returncode == cli.EXIT_ERROR and "--name '../../escaped'" in r.stderr and "Traceback" not in r.stderr
    assert not logs.exists() and not (tmp_path / "escaped").exists()


# --------------------------------------------------------------------------------------------- §6 annotation data
def test_id_outside_int64_is_refused_naming_the_entry(tmp_path):
    anno = write_cuhk(tmp_path, [entry(), entry(split="test", id=10 ** 30)])
    with pytest.raises(DatasetFormatError, match=re.escape(anno) + r": entry 1: key 'id' is 10{30}, outside the 64-bit"):
        CUHKPEDES(root=str(tmp_path), verbose=False)
    write_cuhk(tmp_path, [entry(), entry(split="test", id=str(-2 ** 63 - 1))])
    with pytest.raises(DatasetFormatError, match=r"entry 1: key 'id' is -9223372036854775809, outside"):
        CUHKPEDES(root=str(tmp_path), verbose=False)
    write_cuhk(tmp_path, [entry(), entry(split="test", id=2 ** 63 - 1)])  # the largest int64 is fine
    assert CUHKPEDES(root=str(tmp_path), verbose=False).test["image_pids"] == [2 ** 63 - 1]


@pytest.mark.parametrize("split", ["tset", "Train", "VAL", "", "validation"])
def test_unknown_split_name_is_an_error_listing_the_valid_ones(tmp_path, split):
    anno = write_cuhk(tmp_path, [entry(), entry(split=split, id=7)])
    with pytest.raises(DatasetFormatError) as err:
        CUHKPEDES(root=str(tmp_path), verbose=False)
    assert f"{anno}: entry 1: key 'split' is {split!r}; valid: ['train', 'test', 'val']" in str(err.value)


def test_ids_dropped_for_empty_captions_are_named(tmp_path, caplog):
    """Every caption of id 2 is empty: the warning names id 2 and its entries, and the pid-gap error blames id 2
    (not id 3, the next id present) and says why it is gone."""
    write_cuhk(tmp_path, [entry(id=1), entry(id=2, captions=["", "  "]), entry(id=2, captions=[""]), entry(id=3)])
    with caplog.at_level("WARNING", logger="IRRA.dataset"), pytest.raises(DatasetFormatError) as err:
        CUHKPEDES(root=str(tmp_path), verbose=False)
    assert "id 2 (pid 1) is missing" in str(err.value)
    assert "id 2 was dropped because every caption of its entries [1, 2] is empty" in str(err.value)
    assert any("1 ids have no entry with a non-empty caption and were dropped: id 2 (entries [1, 2])" in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------------------------------------------- §6 image modes
def _save(img, path):
    img.save(path)
    return str(path)


def test_16bit_png_is_scaled_by_its_range_not_clipped_white(tmp_path):
    arr = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode == "I;16"
    assert Image.open(path).convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # what PIL alone does
    out = open_image(path)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


# every mode PIL opens from a file, saved in a format that keeps it: (mode, suffix, pixel value, expected RGB)
MODES = [("1", "png", 1, (255, 255, 255)), ("L", "png", 77, (77, 77, 77)), ("LA", "png", (77, 200), (77, 77, 77)),
         ("P", "png", 0, None), ("PA", "tiff", (0, 255), None), ("RGB", "png", (10, 120, 230), (10, 120, 230)),
         ("RGBA", "png", (10, 120, 230, 40), (10, 120, 230)), ("CMYK", "tiff", (0, 0, 0, 0), (255, 255, 255)),
         ("YCbCr", "tiff", (128, 128, 128), None), ("LAB", "tiff", (50, 128, 128), None),
         ("I", "tiff", 1000, (4, 4, 4)), ("I", "tiff", 77, (77, 77, 77)), ("I;16", "png", 514, (2, 2, 2)),
         ("I;16B", "tiff", 65535, (255, 255, 255)), ("F", "tiff", 0.5, (128, 128, 128)),
         ("F", "tiff", 77.0, (77, 77, 77))]


@pytest.mark.parametrize("mode,suffix,value,expected", MODES, ids=[f"{m[0]}-{m[2]}" for m in MODES])
def test_every_mode_the_loader_accepts_reads_as_rgb(tmp_path, mode, suffix, value, expected):
    img = Image.new(mode, (6, 4), value)
    if mode in ("I", "F"):  # a second value so that the image has a range
        img.putpixel((0, 0), 0)
    path = _save(img, tmp_path / f"x.{suffix}")
    opened_mode = Image.open(path).mode
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (6, 4)
    if expected is None:  # palette / colour spaces: PIL's own conversion, as the original
        with Image.open(path) as raw:
            assert out.tobytes() == raw.convert("RGB").tobytes(), opened_mode
    else:
        assert out.getpixel((5, 3)) == expected, opened_mode


def _exif_image(path, orientation, size=(20, 40)):
    img = Image.new("RGB", size, (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, size[0], 5))  # a red band along the top
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)
    return str(path)


def test_exif_orientation_is_applied_wherever_images_are_read(tmp_path):
    """Orientation 6 (the camera held upright, the sensor rotated): the photo is 40 wide after rotation, the red
    band on the right. Read through open_image, the gallery dataset, the training reader and the grid."""
    path = _exif_image(tmp_path / "phone.jpg", 6)
    assert Image.open(path).size == (20, 40)
    out = open_image(path)
    assert out.size == (40, 20)
    assert out.getpixel((38, 10))[0] > 200 and out.getpixel((2, 10))[0] < 60
    _, via_gallery = ImageFileDataset([path])[0]
    assert via_gallery.size == (40, 20)
    _, via_eval = ImageDataset([0], [path])[0]
    assert via_eval.size == (40, 20)
    from search.grid import draw_search_grid
    draw_search_grid("a man", [path], [0.5])  # the grid reads through open_image too
    plain = _exif_image(tmp_path / "upright.jpg", 1)
    assert open_image(plain).size == (20, 40)


def test_benchmark_images_are_read_exactly_as_before(tmp_path):
    """SynthPEDES (like the benchmark datasets) has no EXIF orientation and is RGB: the tensors the loaders make are
    those of PIL's plain convert("RGB"), bit for bit."""
    from datasets.build import build_transforms

    out = tmp_path / "CUHK-PEDES"
    os.makedirs(out)
    _write_dataset(str(out), synth_params(num_train_ids=2, num_val_ids=1, num_test_ids=1, images_per_id=2,
                                          img_height=64, img_width=32, seed=3), show_progress=False)
    ds = CUHKPEDES(root=str(tmp_path), verbose=False)
    paths = ds.test["img_paths"] + [r[2] for r in ds.train]
    t = build_transforms(img_size=(64, 32), is_train=False)
    for p in paths:
        with Image.open(p) as raw:
            assert not raw.getexif().get(0x0112)
            expected = t(raw.convert("RGB"))
        assert torch.equal(t(open_image(p)), expected)
    _, via_eval = ImageDataset(ds.test["image_pids"], ds.test["img_paths"], t)[0]
    with Image.open(ds.test["img_paths"][0]) as raw:
        assert torch.equal(via_eval, t(raw.convert("RGB")))


# ------------------------------------------------------------------------------------------------ §6 huge images
def test_huge_images_are_named_by_the_image_check_and_the_report(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setattr(dcheck, "HUGE_IMAGE_PIXELS", 30 * 30)
    small = _save(Image.new("RGB", (20, 20)), tmp_path / "small.png")
    big = _save(Image.new("RGB", (40, 30)), tmp_path / "big.png")
    cache = str(tmp_path / "cache")
    for attempt in ("opened", "cached"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="IRRA.dataset.check"):
            dcheck.verify_images([small, big], cache_dir=cache, show_progress=False)
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "1 images of the dataset are huge" in warnings[0], attempt
        assert big in warnings[0] and small not in warnings[0]
    write_cuhk(tmp_path / "d", [entry(file_path="big.png"), entry(split="test", id=5, file_path="small.png")],
               images=())
    imgs = tmp_path / "d" / "CUHK-PEDES" / "imgs"
    Image.new("RGB", (40, 30)).save(imgs / "big.png")
    Image.new("RGB", (20, 20)).save(imgs / "small.png")
    assert tcheck.main(["--root_dir", str(tmp_path / "d"), "--no_progress"]) == tcheck.EXIT_OK
    out = capsys.readouterr().out
    assert "WARNING: 1 images are huge" in out and "big.png: 40x30" in out and "small.png: 20x20" not in out


def test_huge_image_threshold_is_documented():
    readme = open(op.join(REPO, "README.md"), encoding="utf-8").read()
    assert "HUGE_IMAGE_PIXELS" in readme and f"{dcheck.HUGE_IMAGE_PIXELS:,}" in readme


# ------------------------------------------------------------------------------------------------ §6 BPE cost
def test_bpe_cost_is_linear_in_the_word_length(monkeypatch):
    """BPE is quadratic in a word's length: no piece longer than MAX_BPE_WORD is merged, the pieces of an n-letter
    word add up to n letters, and tokenize merges only what it keeps (two pieces at most) whatever the length."""
    tok = get_tokenizer()
    merged = []
    real = type(tok)._merge

    def counting(self, chars, end):
        merged.append(len(chars))
        return real(self, chars, end)

    monkeypatch.setattr(type(tok), "_merge", counting)
    word = "ab" * 20000  # 40,000 letters
    ids = tok.encode(word)
    assert max(merged) <= MAX_BPE_WORD and sum(merged) == len(word)
    assert len(ids) >= len(word) // MAX_BPE_WORD
    merged.clear()
    out = tokenize("a man " + word + " walking", tok, text_length=77)
    assert sum(merged) <= 2 * MAX_BPE_WORD + 10
    assert out[0] == tok.encoder["<|startoftext|>"] and out[-1] == tok.encoder["<|endoftext|>"]


def _reference_tokenize(caption, tok, text_length):
    """The original: encode everything, then cut to text_length with EOT last."""
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    ids = [sot] + tok.encode(caption) + [eot]
    if len(ids) > text_length:
        ids = ids[:text_length]
        ids[-1] = eot
    return ids + [0] * (text_length - len(ids))


def test_cutting_before_bpe_keeps_the_ids_of_normal_captions():
    tok = get_tokenizer()
    fixtures = json.load(open(op.join(REPO, "tests", "fixtures", "datasets.json")))["annotations"]
    captions = [c for d in fixtures.values() for e in d["data"] for c in e.get("captions", [])]
    words = "the woman wears a red jacket black pants and white shoes, carrying a bag; he's walking 2 dogs".split()
    rng = np.random.default_rng(0)
    captions += [" ".join(rng.choice(words, size=n)) for n in (1, 5, 20, 40, 60, 75, 76, 77, 78, 120, 300)]
    assert len(captions) > 20
    for length in (5, 48, 77):
        for c in captions:
            assert tokenize(c, tok, text_length=length).tolist() == _reference_tokenize(c, tok, length), (length, c)


# -------------------------------------------------------------------------------- §6 messages that point the right way
def test_output_dir_that_is_a_file_names_the_option(tiny_cuhk_root, tmp_path):
    from conftest import tiny_train_argv

    blocker = tmp_path / "logs"
    blocker.write_text("not a folder")
    r = run_py("train.py", *tiny_train_argv(tiny_cuhk_root, str(blocker)))
    assert r.returncode == cli.EXIT_ERROR, r.stderr
    assert f"--output_dir {blocker}: '{blocker}' is a file, not a folder" in r.stderr and "Traceback" not in r.stderr
    assert blocker.read_text() == "not a folder"


def test_output_dir_checks(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^--out .*f/sub: '.*f' is a file, not a folder"):
        check_output_dir(str(f / "sub"), "--out")
    check_output_dir(str(tmp_path / "new" / "deeper"), "--out")  # missing folders are fine
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(PermissionError, match=r"^--output_dir .*is read-only"):
                check_output_dir(str(ro / "logs"), "--output_dir")
        finally:
            ro.chmod(0o755)


def test_test_py_does_not_suggest_val_dataset(tmp_path):
    """An empty test split: test.py (which has no --val_dataset) says so without pointing at --val_dataset."""
    from datasets.build import build_eval_loaders

    args = default_args(dataset_name="CUHK-PEDES", root_dir=str(tmp_path))
    args = args.replace(training=False)
    empty = {"img_paths": [], "image_pids": [], "captions": [], "caption_pids": []}
    with pytest.raises(ValueError) as err:
        build_eval_loaders(args, empty, "test")
    assert "--val_dataset" not in str(err.value) and "has no test split" in str(err.value)
    args = args.replace(training=True)
    with pytest.raises(ValueError, match="use --val_dataset val"):
        build_eval_loaders(args, empty, "test")


def test_a_file_name_with_a_newline_draws(tmp_path):
    from search.grid import draw_search_grid, printable

    names = ["a\nb.png", "tab\there.png", "cr\r.png", "plain.png"]
    paths = []
    for n in names:
        paths.append(_save(Image.new("RGB", (20, 40), (200, 0, 0)), tmp_path / n))
    grid = draw_search_grid("a man\nin red", paths, [0.9, 0.8, 0.7, 0.6])
    assert grid.size[0] > 4 * 20
    assert printable("a\nb.png") == "a\\nb.png" and printable("plain name.png") == "plain name.png"


# -------------------------------------------------------------------------------------------- §7 entry points
def test_expected_error_is_one_message_and_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nope" / "configs.yaml")
    r = run_py("test.py", "--config_file", missing)
    assert r.returncode == cli.EXIT_ERROR
    assert "Traceback" not in r.stderr and r.stderr.startswith("test.py: error: ") and missing in r.stderr
    assert "--debug" in r.stderr  # how to see more
    for extra, env in ((["--debug"], None), ([], {cli.DEBUG_ENV: "1"})):
        r = run_py("test.py", "--config_file", missing, *extra, env=env)
        assert r.returncode == cli.EXIT_ERROR and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


@pytest.mark.parametrize("argv,prog", [(["-m", "tools.summarize", "/nonexistent/run"], "python -m tools.summarize"),
                                       (["visualize.py", "--config_file", "/nonexistent/run"], "visualize.py"),
                                       (["train.py", "--config", "/nonexistent.yaml"], "train.py")])
def test_entry_points_end_expected_errors_without_traceback(argv, prog):
    r = run_py(*argv)
    assert r.returncode == cli.EXIT_ERROR, r.stderr
    assert r.stderr.startswith(f"{prog}: error: ") and "Traceback" not in r.stderr and "nonexistent" in r.stderr


def test_dataset_check_bad_dataset_has_no_traceback(tmp_path):
    r = run_py("-m", "tools.check_dataset", "--root_dir", str(tmp_path))
    assert r.returncode == tcheck.EXIT_BAD_DATASET and "Traceback" not in r.stderr and "CUHK-PEDES" in r.stderr


def test_run_main_in_process(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def bad_value(argv):
        raise ValueError(f"--x {argv}: expected something")

    with pytest.raises(SystemExit) as ex:
        cli.run_main(bad_value, ["1", "--debug"], prog="prog")
    assert ex.value.code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "prog: error: --x ['1']: expected something" in err and "Traceback" in err  # --debug removed, honoured
    with pytest.raises(SystemExit) as ex:
        cli.run_main(lambda argv: 3, [], prog="prog")
    assert ex.value.code == 3

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # unexpected: propagates with its traceback
        cli.run_main(bug, [], prog="prog")

    def ctrl_c(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as ex:
        cli.run_main(ctrl_c, [], prog="prog")
    assert ex.value.code == 130 and "prog: interrupted by SIGINT" in capsys.readouterr().err


def test_interrupts_deferred_waits_for_the_block():
    import signal

    done = []
    with pytest.raises(cli.Interrupted) as ex:
        with cli.handle_interrupts((signal.SIGTERM,)):
            with cli.interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("block finished")
    assert done == ["block finished"] and ex.value.exit_code == 143


# ------------------------------------------------------------------------------------------------- §9 environment
def test_configs_and_log_record_the_environment(tiny_cuhk_root, tmp_path):
    import train
    from utils.iotools import load_train_configs

    from conftest import tiny_train_argv

    out = train.main(tiny_train_argv(tiny_cuhk_root, str(tmp_path / "logs"), "--num_epoch", "1"))
    cfg = vars(load_train_configs(out["run_dir"]))
    env = cfg["environment"]
    assert env["torch"] == torch.__version__ and env["gpu"] is None
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    first = open(op.join(out["run_dir"], "train_log.txt")).readline()
    assert f"torch {torch.__version__}, CPU capability {env['cpu_capability']}, GPU none" in first
    # the file still starts a new run as --config (the environment key is no option)
    args = options_module.get_args(["--config", op.join(out["run_dir"], "configs.yaml")])
    assert "environment" not in vars(args)
