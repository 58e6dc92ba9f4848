"""The successors' augmentations (datasets/augment.py): rates, back-translation parsing, determinism, the image pool,
the defaults (identical to the original path), option checks and one training run."""
import json
import math
import os
import os.path as op
import random
from collections import Counter

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import train
from datasets import build as dbuild
from datasets.augment import CaptionAugment, RandomOpsPool, drop_words, image_pool_ops, pick_ops
from datasets.bases import (STREAM_CAPTION, STREAM_IMAGE, STREAM_TEXT, DatasetFormatError, ImageTextDataset,
                            ImageTextMLMDataset, build_random_masked_tokens_and_labels, sample_seed, tokenize)
from datasets.cuhkpedes import CUHKPEDES
from tests.conftest import tiny_train_argv
from utils.choices import IMG_AUG_POOL
from utils.options import default_args, get_args
from utils.simple_tokenizer import get_tokenizer

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIGMAS = 4  # tolerance of the rate tests, in binomial standard deviations


def within(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) <= SIGMAS * math.sqrt(p * (1 - p) / n) + 1e-12


def text_set(captions, captions_bt=None, caption_aug=None, seed=0, mlm=False, img_path="unread.png"):
    rows = [(0, 0, img_path, c) for c in captions]
    cls = ImageTextMLMDataset if mlm else ImageTextDataset
    return cls(rows, None, check_files=False, seed=seed, caption_aug=caption_aug, captions_bt=captions_bt)


# ------------------------------------------------------------------------------------------ text: rates
def test_word_drop_rates():
    """Deletion is applied to a fraction p of the captions and drops a fraction alpha of their words."""
    p, alpha, n_words, n = 0.3, 0.2, 30, 3000
    caption = " ".join(f"w{k}" for k in range(n_words))
    ds = text_set([caption] * n, caption_aug=CaptionAugment(word_drop_rate=alpha, word_drop_apply_prob=p))
    outs = [ds.caption(i) for i in range(n)]
    words = caption.split()
    for out in outs:  # a subsequence of the caption's words, never empty
        kept = out.split()
        assert kept and all(w in words for w in kept) and kept == sorted(kept, key=words.index)
    changed = [o for o in outs if o != caption]
    # a caption changes iff deletion was applied and dropped >= 1 word
    p_changed = p * (1 - (1 - alpha) ** n_words)
    assert within(len(changed) / n, p_changed, n), (len(changed) / n, p_changed)
    # every applied caption drops Binomial(n_words, alpha) words; unapplied ones none
    dropped = sum(n_words - len(o.split()) for o in outs)
    assert within(dropped / (n * n_words), p * alpha, n * n_words), (dropped / (n * n_words), p * alpha)
    # within the changed captions the drop fraction is alpha, conditioned on >= 1 drop
    drop_in_changed = sum(n_words - len(o.split()) for o in changed) / (len(changed) * n_words)
    want = alpha / (1 - (1 - alpha) ** n_words)
    assert within(drop_in_changed, want, len(changed) * n_words), (drop_in_changed, want)


def test_word_drop_keeps_one_word():
    words = ["a", "man", "in", "a", "red", "coat"]
    kept = Counter()
    for s in range(600):
        out = drop_words(" ".join(words), 1.0, random.Random(s))
        assert len(out.split()) == 1 and out in words
        kept[out] += 1
    assert set(kept) == set(words)  # the kept word is drawn, not always the same one
    assert drop_words("single", 1.0, random.Random(0)) == "single"
    assert drop_words("  padded   words ", 0.0, random.Random(0)) == "  padded   words "  # unchanged: as given


def test_backtranslation_rate_and_source():
    """With probability p a caption that has a back-translation is replaced by it; the others never change."""
    p, n = 0.25, 4000
    captions = [f"caption number {i}" for i in range(n)]
    bts = [f"translated back {i}" if i % 2 == 0 else None for i in range(n)]
    ds = text_set(captions, bts, CaptionAugment(backtrans_prob=p))
    outs = [ds.caption(i) for i in range(n)]
    assert all(outs[i] == captions[i] for i in range(1, n, 2))
    with_bt = range(0, n, 2)
    assert all(outs[i] in (captions[i], bts[i]) for i in with_bt)
    rate = sum(outs[i] == bts[i] for i in with_bt) / len(with_bt)
    assert within(rate, p, len(with_bt)), rate


def test_backtranslation_then_word_drop():
    """Deletion applies to the back-translated caption (TBPS-CLIP's order)."""
    ds = text_set(["aa bb cc dd"] * 400, ["ww xx yy zz"] * 400,
                  CaptionAugment(word_drop_rate=0.5, word_drop_apply_prob=1.0, backtrans_prob=0.5))
    outs = [ds.caption(i).split() for i in range(400)]
    from_bt = [o for o in outs if set(o) <= {"ww", "xx", "yy", "zz"}]
    from_caption = [o for o in outs if set(o) <= {"aa", "bb", "cc", "dd"}]
    assert len(from_bt) + len(from_caption) == 400 and from_bt and from_caption
    assert any(len(o) < 4 for o in from_bt)


# ------------------------------------------------------------------------------------------ text: the dataset
def test_augmented_caption_is_tokenized_and_masked(tmp_path):
    """caption_ids are the tokens of the augmented caption; the MLM labels are drawn on them."""
    tok = get_tokenizer()
    captions = [f"the person {i} wears a long black coat and white shoes" for i in range(40)]
    aug = CaptionAugment(word_drop_rate=0.3, word_drop_apply_prob=1.0)
    Image.new("RGB", (4, 8)).save(tmp_path / "x.png")
    ds = text_set(captions, caption_aug=aug, mlm=True, img_path=str(tmp_path / "x.png"))
    ds.set_epoch(2)
    n_changed = 0
    for i in range(len(captions)):
        item, caption = ds[i], ds.caption(i)
        n_changed += caption != captions[i]
        ids = tokenize(caption, tok, 77)
        assert torch.equal(item["caption_ids"], ids)
        chosen = item["mlm_labels"] != 0
        assert chosen.any() and torch.equal(item["mlm_labels"][chosen], ids[chosen])
        want_ids, want_labels = build_random_masked_tokens_and_labels(
            ids.tolist(), tok.encoder["<|mask|>"], random.Random(sample_seed(0, 2, i, STREAM_TEXT)))
        assert torch.equal(item["mlm_ids"], want_ids) and torch.equal(item["mlm_labels"], want_labels)
    assert n_changed > 30  # 1 - 0.7 ** 12 of them


def test_caption_depends_on_seed_epoch_index_only():
    captions = ["a woman with long hair carries a blue bag and wears jeans"] * 20
    aug = CaptionAugment(word_drop_rate=0.3, word_drop_apply_prob=0.8)

    def captions_of(epoch, seed=0):
        ds = text_set(captions, caption_aug=aug, seed=seed)
        ds.set_epoch(epoch)
        return [ds.caption(i) for i in reversed(range(20))][::-1]  # any order of access

    first = captions_of(1)
    random.seed(5)  # the global generators do not matter
    torch.manual_seed(5)
    assert captions_of(1) == first
    assert captions_of(2) != first and captions_of(1, seed=3) != first
    for i, c in enumerate(first):  # the caption stream is the one documented
        assert c == aug(captions[i], None, random.Random(sample_seed(0, 1, i, STREAM_CAPTION)))


# ------------------------------------------------------------------------------------------ annotations
def _entry(**kw):
    e = {"split": "train", "id": 1, "file_path": "a.png", "captions": ["a man", "a tall man"]}
    e.update(kw)
    return e


def _write(root, data):
    d = op.join(root, "CUHK-PEDES")
    os.makedirs(op.join(d, "imgs"), exist_ok=True)
    with open(op.join(d, "reid_raw.json"), "w") as f:
        json.dump(data, f)


def test_captions_bt_parsed_aligned_with_train_rows(tmp_path):
    data = [_entry(captions_bt=["one man", ""]),
            _entry(id=2, file_path="b.png", captions=["  ", "a girl", "a kid"], captions_bt=["dropped", "one girl", "x"]),
            _entry(id=3, file_path="c.png", captions=["no translation here"]),
            _entry(split="test", id=9, captions=["test caption"], captions_bt=["not used"])]
    _write(tmp_path, data)
    ds = CUHKPEDES(root=str(tmp_path), verbose=False)
    assert [r[3] for r in ds.train] == ["a man", "a tall man", "a girl", "a kid", "no translation here"]
    # blank translations and entries without any are None; the blank caption's translation went with it
    assert ds.train_captions_bt == ["one man", None, "one girl", "x", None]
    # the rows and splits are those of the same file without captions_bt
    plain = tmp_path / "plain"
    _write(plain, [{k: v for k, v in e.items() if k != "captions_bt"} for e in data])
    ref = CUHKPEDES(root=str(plain), verbose=False)
    def rel(rows, root):
        return [(pid, image_id, op.relpath(path, str(root)), caption) for pid, image_id, path, caption in rows]
    assert rel(ds.train, tmp_path) == rel(ref.train, plain) and ref.train_captions_bt is None
    assert ds.test["captions"] == ref.test["captions"] and ds.val == ref.val


@pytest.mark.parametrize("bt,msg", [
    (["only one"], r"entry 0: key 'captions_bt' has 1 items but 'captions' has 2; they must be aligned one-to-one"),
    ("one man", r"entry 0: key 'captions_bt' must be a list of strings"),
    (["one man", 3], r"entry 0: key 'captions_bt'\[1\] must be a string, got 3")])
def test_bad_captions_bt_names_the_entry(tmp_path, bt, msg):
    _write(tmp_path, [_entry(captions_bt=bt)])
    with pytest.raises(DatasetFormatError, match=r"reid_raw.json: " + msg):
        CUHKPEDES(root=str(tmp_path), verbose=False)


# ------------------------------------------------------------------------------------------ image pool
def test_pick_ops_draws_distinct_ops_uniformly():
    n = 3000
    pairs, singles = Counter(), Counter()
    for s in range(n):
        picked = pick_ops(6, 2, torch.Generator().manual_seed(s))
        assert len(picked) == 2 and len(set(picked)) == 2 and all(0 <= i < 6 for i in picked)
        pairs[frozenset(picked)] += 1
        singles.update(picked)
    assert len(pairs) == 15 and all(within(c / n, 1 / 15, n) for c in pairs.values()), pairs
    assert all(within(c / n, 1 / 3, n) for c in singles.values()), singles
    assert sorted(pick_ops(6, 6, torch.Generator().manual_seed(0))) == list(range(6))
    with pytest.raises(ValueError, match=r"n_ops must be in \[1, 6\]"):
        pick_ops(6, 7)


def test_pool_applies_exactly_the_picked_ops_in_order():
    calls = []

    def op(name):
        return name, lambda x: calls.append(name) or x + [name]

    pool = RandomOpsPool([op(n) for n in "abcdef"], 2, on_pick=lambda names: calls.append(tuple(names)))
    for s in range(50):
        calls.clear()
        torch.manual_seed(s)
        out = pool([])
        want = ["abcdef"[i] for i in pick_ops(6, 2, torch.Generator().manual_seed(s))]
        assert out == want and calls == [tuple(want), *want]
    with pytest.raises(ValueError, match=r"--img_aug_pool_ops 0: expected 1..6"):
        RandomOpsPool(image_pool_ops((8, 4)), 0)


def test_pool_pipeline_and_ops():
    tf = dbuild.build_transforms((48, 16), aug=True, is_train=True, pool=True, pool_ops=2)
    assert [type(t) for t in tf.transforms] == [T.Resize, T.ToTensor, RandomOpsPool, T.Normalize]
    assert tf.transforms[3].mean == MEAN and tf.transforms[3].std == STD
    ops = dict(image_pool_ops((48, 16)))
    assert tuple(ops) == IMG_AUG_POOL
    assert ops["resized_crop"].size == (48, 16) and ops["resized_crop"].scale == (0.9, 1.0)
    assert ops["erasing"].p == 0.5 and ops["erasing"].scale == (0.10, 0.20) and ops["erasing"].value == 0
    assert ops["grayscale"].p == 0.1 and ops["flip"].p == 0.5 and ops["rotation"].degrees == [-15.0, 15.0]
    assert ops["color_jitter"].brightness == (0.9, 1.1) and ops["color_jitter"].hue is None
    x = torch.rand(3, 48, 16)
    for a in ops.values():
        for b in ops.values():
            assert b(a(x)).shape == (3, 48, 16)


def test_pool_draws_from_the_sample_generator(tiny_cuhk_root):
    """The picks and the image are functions of (seed, epoch, index): recomputed by hand from the sample's seed."""
    ds = build_parser_dataset(tiny_cuhk_root)
    picks = []
    tf = dbuild.build_transforms((32, 16), is_train=True, pool=True)
    tf.transforms[2].on_pick = picks.append
    train_set = ImageTextDataset(ds.train, tf, seed=7)
    train_set.set_epoch(3)
    for i in (0, 5, 11):
        picks.clear()
        img = train_set[i]["images"]
        s = sample_seed(7, 3, i, STREAM_IMAGE)
        want = [IMG_AUG_POOL[k] for k in pick_ops(6, 2, torch.Generator().manual_seed(s))]
        assert picks == [want]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            x = T.ToTensor()(T.Resize((32, 16))(Image.open(ds.train[i][2]).convert("RGB")))
            ops = dict(image_pool_ops((32, 16)))
            for name in [IMG_AUG_POOL[k] for k in torch.randperm(6)[:2].tolist()]:
                x = ops[name](x)
            x = T.Normalize(MEAN, STD)(x)
        assert torch.equal(img, x)
        assert torch.equal(train_set[i]["images"], img)
    epoch3 = [train_set[i]["images"] for i in range(4)]
    train_set.set_epoch(4)
    assert not all(torch.equal(train_set[i]["images"], epoch3[i]) for i in range(4))


# ------------------------------------------------------------------------------------------ defaults = today
def build_parser_dataset(root):
    return CUHKPEDES(root=root, verbose=False)


@pytest.mark.parametrize("img_aug", [False, True])
def test_defaults_reproduce_the_original_path(tiny_cuhk_root, img_aug):
    """Every new option off: the train items are the original pipelines' (recomputed here from the sample seeds)."""
    args = default_args(root_dir=tiny_cuhk_root, img_size=(32, 16), img_aug=img_aug, MLM=True, num_workers=0,
                        batch_size=4, seed=5)
    ds = build_parser_dataset(tiny_cuhk_root)
    loader = dbuild.build_train_loader(args, ds)
    train_set = loader.dataset
    assert train_set.caption_aug is None
    steps = [T.Resize((32, 16)), T.RandomHorizontalFlip(0.5)]
    if img_aug:
        steps += [T.Pad(10), T.RandomCrop((32, 16))]
    steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
    if img_aug:
        steps.append(T.RandomErasing(scale=(0.02, 0.4), value=list(MEAN)))
    original = T.Compose(steps)
    tok = get_tokenizer()
    train_set.set_epoch(2)
    for i in range(len(ds.train)):
        item = train_set[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(5, 2, i, STREAM_IMAGE))
            img = original(Image.open(ds.train[i][2]).convert("RGB"))
        ids = tokenize(ds.train[i][3], tok, 77)
        mlm_ids, mlm_labels = build_random_masked_tokens_and_labels(
            ids.tolist(), tok.encoder["<|mask|>"], random.Random(sample_seed(5, 2, i, STREAM_TEXT)))
        assert torch.equal(item["images"], img)
        assert torch.equal(item["caption_ids"], ids)
        assert torch.equal(item["mlm_ids"], mlm_ids) and torch.equal(item["mlm_labels"], mlm_labels)


def test_text_aug_leaves_images_and_unchanged_captions_alone(tiny_cuhk_root):
    ds = build_parser_dataset(tiny_cuhk_root)
    tf = dbuild.build_transforms((32, 16), aug=True, is_train=True)
    plain = ImageTextMLMDataset(ds.train, tf, seed=2)
    aug = ImageTextMLMDataset(ds.train, tf, seed=2,
                              caption_aug=CaptionAugment(word_drop_rate=0.05, word_drop_apply_prob=0.5))
    n_same = 0
    for i in range(len(ds.train)):
        a, b = plain[i], aug[i]
        assert torch.equal(a["images"], b["images"])
        if aug.caption(i) == ds.train[i][3]:
            n_same += 1
            assert all(torch.equal(a[k], b[k]) for k in ("images", "caption_ids", "mlm_ids", "mlm_labels"))
    assert 0 < n_same < len(ds.train)


# ------------------------------------------------------------------------------------------ loader and options
@pytest.fixture(scope="module")
def bt_root(tiny_cuhk_root, tmp_path_factory):
    """The tiny dataset with a back-translation for every other caption (imgs/ linked, not copied)."""
    root = tmp_path_factory.mktemp("bt")
    src = op.join(tiny_cuhk_root, "CUHK-PEDES")
    os.makedirs(root / "CUHK-PEDES")
    os.symlink(op.join(src, "imgs"), root / "CUHK-PEDES" / "imgs")
    with open(op.join(src, "reid_raw.json")) as f:
        annos = json.load(f)
    for a in annos:
        a["captions_bt"] = [("a person: " + c.lower()) if j % 2 == 0 else "" for j, c in enumerate(a["captions"])]
    with open(root / "CUHK-PEDES" / "reid_raw.json", "w") as f:
        json.dump(annos, f)
    return str(root)


def test_loader_same_batches_with_workers(bt_root):
    opts = dict(root_dir=bt_root, img_size=(32, 16), MLM=True, batch_size=4, seed=3, txt_aug_word_drop_rate=0.2,
                txt_aug_backtrans_prob=0.5, img_aug_pool=True, img_aug_pool_ops=3)
    ds = build_parser_dataset(bt_root)
    batches = {}
    for workers in (0, 2):
        loader = dbuild.build_train_loader(default_args(num_workers=workers, **opts), ds)
        dbuild.set_train_epoch(loader, 2)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2])
    for b0, b2 in zip(batches[0], batches[2]):
        assert set(b0) == set(b2) and all(torch.equal(b0[k], b2[k]) for k in b0)


def test_backtrans_without_captions_bt_is_an_error(tiny_cuhk_root):
    args = default_args(root_dir=tiny_cuhk_root, img_size=(32, 16), txt_aug_backtrans_prob=0.1, num_workers=0)
    with pytest.raises(ValueError, match=r"--txt_aug_backtrans_prob 0.1: no train caption of .*reid_raw.json has a "
                                         r"back-translation"):
        dbuild.build_train_loader(args, build_parser_dataset(tiny_cuhk_root))


@pytest.mark.parametrize("option", ["--txt_aug_word_drop_rate", "--txt_aug_word_drop_apply_prob",
                                    "--txt_aug_backtrans_prob"])
@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_probabilities_outside_0_1_are_rejected(option, value):
    extra = ["--txt_aug_word_drop_rate", "0.1"] if option == "--txt_aug_word_drop_apply_prob" else []
    with pytest.raises(ValueError, match=rf"{option} {value}: expected a probability in \[0, 1\]"):
        get_args([*extra, option, value])
    with pytest.raises(ValueError, match=rf"--{option[2:]} {float(value)}: expected a probability in \[0, 1\]"):
        CaptionAugment(**{option[len("--txt_aug_"):]: float(value)})


@pytest.mark.parametrize("argv,msg", [
    (["--txt_aug_word_drop_apply_prob", "0.5"], r"--txt_aug_word_drop_apply_prob 0.5: expected 1.0 \(its default\) "
                                                r"while --txt_aug_word_drop_rate is 0"),
    (["--txt_aug_word_drop_rate", "0.1", "--txt_aug_word_drop_apply_prob", "0"],
     r"--txt_aug_word_drop_rate 0.1: expected 0 while --txt_aug_word_drop_apply_prob is 0"),
    (["--img_aug_pool_ops", "3"], r"--img_aug_pool_ops 3: expected 2 \(its default\) without --img_aug_pool"),
    (["--img_aug_pool", "--img_aug_pool_ops", "7"], r"--img_aug_pool_ops 7: expected 1..6 \(the pool: \['resized_crop'"),
    (["--img_aug_pool", "--img_aug_pool_ops", "0"], r"--img_aug_pool_ops 0: expected 1..6")])
def test_options_without_effect_or_out_of_range_are_rejected(argv, msg):
    with pytest.raises(ValueError, match=msg):
        get_args(argv)


def test_options_default_off():
    a = get_args([])
    assert (a.txt_aug_word_drop_rate, a.txt_aug_word_drop_apply_prob, a.txt_aug_backtrans_prob) == (0.0, 1.0, 0.0)
    assert a.img_aug_pool is False and a.img_aug_pool_ops == 2


def test_training_with_every_augmentation(bt_root, tmp_path):
    out = train.main(tiny_train_argv(bt_root, str(tmp_path / "logs"), "--txt_aug_word_drop_rate", "0.05",
                                     "--txt_aug_backtrans_prob", "0.1", "--img_aug_pool", "--num_epoch", "1"))
    with open(op.join(out["run_dir"], "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1]
    with open(op.join(bt_root, "CUHK-PEDES", "reid_raw.json")) as f:
        train_caps = [c for a in json.load(f) if a["split"] == "train" for c in a["captions_bt"]]
    n_bt = sum(bool(c) for c in train_caps)
    log = open(op.join(out["run_dir"], "train_log.txt")).read()
    assert "caption augmentation: CaptionAugment(word_drop_rate=0.05, word_drop_apply_prob=1.0, " \
           "backtrans_prob=0.1)" in log
    assert f"back-translations: {n_bt} of {len(train_caps)} train captions have one" in log
    assert "image augmentation pool: 2 of ['resized_crop'" in log
