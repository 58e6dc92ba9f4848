"""datasets/check.py: the pre-training image check (errors, cache); tools/check_dataset.py: the dataset report."""
import json
import os
import os.path as op
import re
import shutil

import pytest
from PIL import Image

from datasets import check as dcheck
from tools import check_dataset as tcheck
from datasets.build import build_dataset
from datasets.check import ImageCheckError, check_dataset_images, verify_images

ANNO = "reid_raw.json"


@pytest.fixture
def root(tmp_path, tiny_cuhk_root):
    """A private copy of the tiny CUHK-PEDES layout (tests corrupt it)."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_cuhk_root, dst)
    return str(dst)


def annos(root):
    with open(op.join(root, "CUHK-PEDES", ANNO)) as f:
        return json.load(f)


def write_annos(root, data):
    with open(op.join(root, "CUHK-PEDES", ANNO), "w") as f:
        json.dump(data, f)


def img(root, anno):
    return op.join(root, "CUHK-PEDES", "imgs", anno["file_path"])


def split_of(anno):
    return anno["split"] if anno["split"] in ("train", "test") else "val"


def first(root, split, k=0):
    return [a for a in annos(root) if split_of(a) == split][k]


class CountOpens:
    """Counts PIL.Image.open calls (and still opens)."""

    def __init__(self, monkeypatch):
        self.paths = []
        real = Image.open

        def counting_open(fp, *args, **kwargs):
            self.paths.append(str(fp))
            return real(fp, *args, **kwargs)

        monkeypatch.setattr(Image, "open", counting_open)


# ---------------------------------------------------------------------------------------------------- verify_images
def test_check_passes_then_second_call_opens_nothing(root, monkeypatch):
    ds = build_dataset("CUHK-PEDES", root, verbose=False)
    all_imgs = {img(root, a) for a in annos(root)}
    opens = CountOpens(monkeypatch)
    first_run = check_dataset_images(ds, show_progress=False)
    assert sorted(opens.paths) == sorted(all_imgs)  # every image opened exactly once
    assert (first_run.total, first_run.opened, first_run.cached) == (len(all_imgs), len(all_imgs), 0)
    assert op.isfile(op.join(root, "CUHK-PEDES", ".irra_image_check", "verified.json"))

    opens.paths.clear()
    second = check_dataset_images(ds, show_progress=False)
    assert opens.paths == []
    assert (second.opened, second.cached) == (0, len(all_imgs))

    # a changed file (new size and mtime) is checked again, and only it
    changed = img(root, first(root, "val"))
    Image.new("RGB", (20, 40), (9, 9, 9)).save(changed)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    check_dataset_images(ds, show_progress=False)
    assert opens.paths == [changed]


def test_corrupt_test_image_is_named_and_only_checked_splits_count(root):
    bad = img(root, first(root, "test", 1))
    with open(bad, "r+b") as f:  # truncate to half
        f.truncate(os.path.getsize(bad) // 2)
    ds = build_dataset("CUHK-PEDES", root, verbose=False)
    assert check_dataset_images(ds, splits=("train", "val"), show_progress=False).opened > 0
    with pytest.raises(ImageCheckError) as info:
        check_dataset_images(ds, splits=("train", "test"), show_progress=False)
    err = info.value
    assert isinstance(err, ValueError)
    assert [(p.path, p.kind) for p in err.problems] == [(bad, "unreadable")]
    msg = str(err)
    n_files = sum(split_of(a) in ("train", "test") for a in annos(root))
    assert f"1 of {n_files} image files" in msg
    assert f"{bad}: unreadable: " in msg
    assert "--skip_image_check" in msg
    # the bad file is not cached: fixing it makes the check pass
    Image.new("RGB", (32, 64)).save(bad)
    assert check_dataset_images(ds, splits=("test",), show_progress=False).opened == 1


def test_error_names_missing_zero_byte_and_random_bytes(root):
    test_annos = [a for a in annos(root) if split_of(a) == "test"]
    missing, empty, noise = (img(root, a) for a in test_annos[:3])
    os.remove(missing)
    open(empty, "wb").close()
    with open(noise, "wb") as f:
        f.write(os.urandom(300))
    ds = build_dataset("CUHK-PEDES", root, verbose=False)
    with pytest.raises(ImageCheckError) as info:
        check_dataset_images(ds, show_progress=False)
    got = {p.path: p.kind for p in info.value.problems}
    assert got == {missing: "missing", empty: "zero bytes", noise: "unreadable"}
    lines = str(info.value).splitlines()
    assert f"  {missing}: missing" in lines
    assert f"  {empty}: zero bytes" in lines
    assert any(line.startswith(f"  {noise}: unreadable: ") for line in lines)


def test_error_shows_at_most_max_bad_shown_and_counts_the_rest(tmp_path):
    n = dcheck.MAX_BAD_SHOWN + 5
    paths = [str(tmp_path / f"nope{i}.jpg") for i in range(n)]
    with pytest.raises(ImageCheckError) as info:
        verify_images(paths + paths[:3], show_progress=False)  # duplicates count once
    msg = str(info.value)
    assert len(info.value.problems) == n
    assert sum(line.endswith(": missing") for line in msg.splitlines()) == dcheck.MAX_BAD_SHOWN
    assert "... and 5 more" in msg
    assert f"{n} of {n} image files" in msg


def test_unwritable_or_broken_cache_is_skipped(tmp_path, monkeypatch):
    good = str(tmp_path / "a.png")
    Image.new("RGB", (16, 32)).save(good)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache_dir = str(blocker / "cache")  # cannot be created: its parent is a file
    assert verify_images([good], cache_dir=cache_dir, show_progress=False).opened == 1
    assert verify_images([good], cache_dir=cache_dir, show_progress=False).opened == 1
    assert not op.exists(cache_dir)

    ok_dir = tmp_path / "cache"
    ok_dir.mkdir()
    (ok_dir / "verified.json").write_text("{not json")
    assert verify_images([good], cache_dir=str(ok_dir), show_progress=False).opened == 1
    assert verify_images([good], cache_dir=str(ok_dir), show_progress=False).opened == 0
    assert [f for f in os.listdir(ok_dir)] == ["verified.json"]  # no temp file left


def test_a_verify_level_cache_does_not_stand_for_a_full_load(tmp_path):
    good = str(tmp_path / "a.png")
    Image.new("RGB", (16, 32)).save(good)
    cache = str(tmp_path / "cache")
    assert verify_images([good], cache_dir=cache, level="verify", show_progress=False).opened == 1
    assert verify_images([good], cache_dir=cache, level="load", show_progress=False).opened == 1
    assert verify_images([good], cache_dir=cache, level="verify", show_progress=False).opened == 0
    # verify() reads the structure only: a JPEG cut short after its headers passes it, a full load does not
    cut = str(tmp_path / "cut.jpg")
    noise = Image.frombytes("RGB", (64, 128), os.urandom(64 * 128 * 3))
    noise.save(cut, quality=90)
    with open(cut, "r+b") as f:
        f.truncate(int(os.path.getsize(cut) * 0.8))
    assert verify_images([cut], level="verify", show_progress=False).opened == 1
    with pytest.raises(ImageCheckError, match="truncated"):
        verify_images([cut], level="load", show_progress=False)
    with pytest.raises(ValueError, match=r"'decode'.*\['exists', 'verify', 'load'\]"):
        verify_images([good], level="decode")


# ---------------------------------------------------------------------------------------------------- the report
def run(root, capsys, *extra):
    code = tcheck.main(["--dataset_name", "CUHK-PEDES", "--root_dir", root, "--no_progress", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_on_the_tiny_dataset(root, capsys):
    code, out, _ = run(root, capsys)
    assert code == 0
    for split in ("train", "test", "val"):
        entries = [a for a in annos(root) if split_of(a) == split]
        ids = len({a["id"] for a in entries})
        caps = sum(len(a["captions"]) for a in entries)
        assert f"  {split}: {ids} ids, {len(entries)} images, {caps} captions" in out.splitlines()
    assert f"Images: {len(annos(root))} files" in out
    assert "WARNING" not in out and "ERROR" not in out
    assert out.rstrip().endswith("OK")


def test_report_names_missing_zero_byte_and_corrupt_files(root, capsys):
    train = [a for a in annos(root) if split_of(a) == "train"]
    missing, empty, corrupt = img(root, train[0]), img(root, train[3]), img(root, first(root, "val"))
    os.remove(missing)
    open(empty, "wb").close()
    with open(corrupt, "r+b") as f:
        f.truncate(os.path.getsize(corrupt) // 2)
    code, out, _ = run(root, capsys)
    assert code == tcheck.EXIT_BAD_IMAGES
    lines = out.splitlines()
    assert f"    {missing}: missing" in lines
    assert f"    {empty}: zero bytes" in lines
    assert any(line.startswith(f"    {corrupt}: unreadable: ") for line in lines)
    assert f"FAILED: 3 of {len(annos(root))} image files cannot be read." in lines


def test_report_warns_about_tiny_images(root, capsys):
    small = img(root, first(root, "test"))
    Image.new("RGB", (8, 8), (200, 10, 10)).save(small)
    code, out, _ = run(root, capsys)
    assert code == 0
    assert "WARNING: 1 images are tiny" in out
    assert f"    {small}: 8x8" in out.splitlines()


def test_report_warns_about_duplicate_paths_and_shared_ids(root, capsys):
    data = annos(root)
    train = [i for i, a in enumerate(data) if split_of(a) == "train"]
    test = [i for i, a in enumerate(data) if split_of(a) == "test"]
    val = [i for i, a in enumerate(data) if split_of(a) == "val"]
    dup_in_train = data[train[0]]["file_path"]
    data[train[1]]["file_path"] = dup_in_train            # twice in train
    shared_path = data[train[2]]["file_path"]
    data[test[0]]["file_path"] = shared_path              # in train and test
    shared_id = data[train[0]]["id"]
    data[val[0]]["id"] = shared_id                        # identity in train and val
    write_annos(root, data)
    code, out, _ = run(root, capsys)
    assert code == 0
    lines = out.splitlines()
    assert "  WARNING: 1 image paths are listed more than once in train:" in lines
    assert f"    {img(root, data[train[0]])} (2 times)" in lines
    assert "  WARNING: 1 image paths are in more than one split:" in lines
    assert f"    {img(root, data[train[2]])} (train, test)" in lines
    assert "  WARNING: 1 identities (annotation ids) are in more than one split:" in lines
    assert f"    id {shared_id} (train, val)" in lines


def test_report_caption_lengths_and_the_cut_count(root, capsys):
    data = annos(root)
    # "a" is one BPE token; with SOT/EOT: "a person" is 4 tokens, six "a" are 8 (fits --text_length 8), seven 9 (cut)
    captions = {4: "a person", 8: " ".join(["a"] * 6), 9: " ".join(["a"] * 7)}
    lengths, cut = [], {"train": 0, "test": 0, "val": 0}
    for i, a in enumerate(data):
        n = (4, 8, 9)[i % 3]
        a["captions"] = [captions[4], captions[n]]
        lengths += [4, n]
        cut[split_of(a)] += n > 8
    write_annos(root, data)
    code, out, _ = run(root, capsys, "--text_length", "8")
    assert code == 0
    lengths.sort()
    median = (lengths[(len(lengths) - 1) // 2] + lengths[len(lengths) // 2]) / 2
    assert f"  min 4  median {median:g}  p95 9  max 9" in out.splitlines()
    assert (f"  --text_length 8 cuts {sum(cut.values())} of {len(lengths)} captions "
            f"(train {cut['train']}, test {cut['test']}, val {cut['val']})") in out.splitlines()
    hist = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"^\s+(\d+) \| #* (\d+)$", out, re.M)}
    assert hist == {n: lengths.count(n) for n in range(4, 10)}


def test_report_shows_parser_errors_cleanly(root, capsys):
    data = annos(root)
    del data[2]["captions"]
    write_annos(root, data)
    code, out, err = run(root, capsys)
    assert code == tcheck.EXIT_BAD_DATASET
    assert "entry 2: missing key 'captions'" in err
    assert "Traceback" not in err and "Splits:" not in out
    code, _, err = run(str(op.join(root, "nowhere")), capsys)
    assert code == tcheck.EXIT_BAD_DATASET and "is not available" in err
