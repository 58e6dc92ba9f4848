"""TBPS-CLIP's training data: the four views, pre_caption'd and augmented captions, per-sample determinism, the
back-translation trap (no captions_bt: off with a warning), batches the model trains on."""
import logging
import random

import pytest
import torch

from datasets.build import build_dataset, collate
from methods.tbps.data import TBPSTrainDataset, caption_augment, ss_transform
from methods.tbps.functions import pre_caption, tokenize


@pytest.fixture(scope="module")
def ds(tiny_cuhk_root):
    return build_dataset("CUHK-PEDES", root=tiny_cuhk_root, verbose=False)


def test_sample_has_tbps_views_and_ids(ds):
    train = TBPSTrainDataset(ds.train[:6], (64, 32), seed=1)
    s = train[3]
    assert set(s) == {"images", "aug1", "aug_ss_1", "aug_ss_2", "caption_ids", "pids"}
    for k in ("images", "aug1", "aug_ss_1", "aug_ss_2"):
        assert s[k].shape == (3, 64, 32) and s[k].dtype == torch.float32
    assert not torch.equal(s["aug_ss_1"], s["aug_ss_2"])  # two draws
    assert s["pids"] == ds.train[3][0]
    assert torch.equal(s["caption_ids"], tokenize(pre_caption(ds.train[3][3], 77), 77)[0])
    again = TBPSTrainDataset(ds.train[:6], (64, 32), seed=1)[3]
    assert all(torch.equal(s[k], again[k]) for k in s if k != "pids")  # a function of (seed, epoch, index)
    train.set_epoch(1)
    assert not torch.equal(train[3]["aug_ss_1"], s["aug_ss_1"])
    b = collate([train[i] for i in range(4)])
    assert b["images"].shape == (4, 3, 64, 32) and b["pids"].dtype == torch.long and b["caption_ids"].shape == (4, 77)


def test_switched_off_views_are_not_made(ds):
    s = TBPSTrainDataset(ds.train[:2], (64, 32), with_ss=False, with_aug1=False)[0]
    assert set(s) == {"images", "caption_ids", "pids"}


def test_backtranslation_without_captions_bt_is_off_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="IRRA.dataset"):
        aug = caption_augment(0.0, 0.1, None, source="x.json")
    assert aug is None and "back-translation is off" in caplog.text and "x.json" in caplog.text
    aug = caption_augment(0.05, 0.1, ["", None])
    assert aug is not None and aug.backtrans_prob == 0.0 and aug.word_drop_rate == 0.05


def test_backtranslations_are_pre_captioned_and_used(ds):
    rows = ds.train[:2]
    bts = ["The Back-Translation (one).", None]
    aug = caption_augment(0.0, 1.0, bts)
    train = TBPSTrainDataset(rows, (64, 32), caption_aug=aug, captions_bt=bts, with_ss=False, with_aug1=False)
    assert train.caption(0) == "the back-translation one"
    assert train.caption(1) == pre_caption(rows[1][3], 77)  # no back-translation: the caption stays


def test_ss_view_draws_follow_the_torch_seed(ds):
    from PIL import Image
    img = Image.open(ds.train[0][2]).convert("RGB")
    t = ss_transform((64, 32))
    torch.manual_seed(5)
    a = t(img)
    torch.manual_seed(5)
    random.seed(123)  # python's generator plays no part
    assert torch.equal(a, t(img))
