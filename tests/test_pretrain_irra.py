"""--pretrain_choice <IRRA checkpoint>: fine-tune from an IRRA-format best.pth (the original's layout, a module. prefix,
a bare state dict), positional embeddings resized, a classifier for another number of identities fresh, clear errors
for unreadable files."""
import logging
import os
import random

import pytest
import torch
import yaml

import train
from model.build import build_model
from model.clip_model import resize_pos_embed, resize_text_pos_embed
from tests.conftest import tiny_train_argv
from utils.checkpoint import CheckpointReadError
from utils.options import default_args

NUM_CLASSES = 6


def tiny_args(**overrides):
    kw = dict(pretrain_choice="scratch:ViT-Micro", img_size=(64, 32), loss_names="sdm+mlm+id", cmt_depth=1,
              device="cpu", precision="fp32")
    kw.update(overrides)
    return default_args(**kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path of {"model": sd}, sd): a tiny IRRA's weights perturbed by a seeded generator (so they differ from any
    fresh init)."""
    torch.manual_seed(0)
    model = build_model(tiny_args(), NUM_CLASSES)
    gen = torch.Generator().manual_seed(1234)
    sd = {k: v + torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    path = str(tmp_path_factory.mktemp("pre") / "best.pth")
    torch.save({"model": sd}, path)
    return path, sd


def assert_same(got, expected, skip=()):
    for k, v in expected.items():
        if k not in skip:
            assert torch.equal(got[k], v), k


@pytest.mark.parametrize("layout", ["original", "module", "bare", "ours"])
def test_same_config_loads_every_tensor(saved, tmp_path, layout):
    _, sd = saved
    if layout == "original":
        obj = {"model": sd}
    elif layout == "module":
        obj = {"model": {"module." + k: v for k, v in sd.items()}}
    elif layout == "bare":
        obj = sd
    else:  # our last.pth: optimizer / scheduler / epoch next to the model
        obj = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "best_top1": 1.5}
    path = str(tmp_path / "ckpt.pth")
    torch.save(obj, path)
    model = build_model(tiny_args(pretrain_choice=path), NUM_CLASSES)
    got = model.state_dict()
    assert set(got) == set(sd)
    assert_same(got, sd)


def test_fp16_checkpoint_like_the_original(saved, tmp_path):
    """The original's best.pth holds fp16 weights (convert_weights): loaded as their fp32 values."""
    _, sd = saved
    path = str(tmp_path / "half.pth")
    torch.save({"model": {k: v.half() for k, v in sd.items()}}, path)
    got = build_model(tiny_args(pretrain_choice=path), NUM_CLASSES).state_dict()
    for k, v in sd.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], v.half().float()), k


def test_other_img_size_resizes_visual_pos_embed(saved, caplog):
    path, sd = saved
    with caplog.at_level(logging.INFO, logger="IRRA"):
        model = build_model(tiny_args(pretrain_choice=path, img_size=(96, 32)), NUM_CLASSES)
    got = model.state_dict()
    key = "base_model.visual.positional_embedding"
    assert got[key].shape == (1 + 6 * 2, 64)  # 96x32, patch 16 -> 6x2 grid
    # the checkpoint's 64x32 image -> a 4x2 grid (not square): resized bilinearly to 6x2
    expected = resize_pos_embed(sd[key], got[key], 6, 2, old_grid=(4, 2))
    torch.testing.assert_close(got[key], expected)
    # independent check: the class token kept, the 4x2 grid interpolated as an image
    grid = sd[key][1:].reshape(1, 4, 2, -1).permute(0, 3, 1, 2)  # [8, D] -> [1, D, 4, 2]
    grid = torch.nn.functional.interpolate(grid, size=(6, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got[key], torch.cat([sd[key][:1], grid.permute(0, 2, 3, 1).reshape(12, -1)]))
    assert_same(got, sd, skip={key})
    out = model.encode_image(torch.randn(2, 3, 96, 32))
    assert out.shape == (2, 64)
    text = caplog.text
    assert "1 resized" in text and f"{key} (9, 64) -> (13, 64)" in text and "0 skipped" in text


def test_configs_yaml_next_to_checkpoint_gives_the_grid(saved, tmp_path):
    """16 positions (a square 4x4 for inference) from a run whose configs.yaml says 128x32 (an 8x2 grid)."""
    torch.manual_seed(0)
    src = build_model(tiny_args(img_size=(128, 32)), NUM_CLASSES).state_dict()
    path = str(tmp_path / "best.pth")
    torch.save({"model": src}, path)
    with open(tmp_path / "configs.yaml", "w") as f:
        yaml.safe_dump({"img_size": [128, 32], "stride_size": 16}, f)
    got = build_model(tiny_args(pretrain_choice=path, img_size=(96, 32)), NUM_CLASSES).state_dict()
    key = "base_model.visual.positional_embedding"
    torch.testing.assert_close(got[key], resize_pos_embed(src[key], got[key], 6, 2, old_grid=(8, 2)))
    assert not torch.allclose(got[key], resize_pos_embed(src[key], got[key], 6, 2, old_grid=(4, 4)))


def test_ambiguous_grid_is_an_error(tmp_path):
    """64x64 -> 4x4 = 16 positions; for a new 24x8 grid 16 fits 2x8 (same width) and 4x4 (square): no guess."""
    torch.manual_seed(0)
    src = build_model(tiny_args(img_size=(64, 64)), NUM_CLASSES).state_dict()
    path = str(tmp_path / "best.pth")
    torch.save({"model": src}, path)
    with pytest.raises(ValueError) as err:
        build_model(tiny_args(pretrain_choice=path, img_size=(384, 128)), NUM_CLASSES)
    msg = str(err.value)
    assert path in msg and "configs.yaml" in msg and "(2, 8)" in msg and "(4, 4)" in msg


def test_other_num_classes_keeps_a_fresh_classifier(saved, caplog):
    path, sd = saved
    torch.manual_seed(7)
    plain = build_model(tiny_args(), 9).state_dict()
    torch.manual_seed(7)
    with caplog.at_level(logging.INFO, logger="IRRA"):
        got = build_model(tiny_args(pretrain_choice=path), 9).state_dict()
    for k in ("classifier.weight", "classifier.bias"):
        assert got[k].shape[0] == 9 and sd[k].shape[0] == NUM_CLASSES
        assert torch.equal(got[k], plain[k]), k
    assert not torch.equal(got["classifier.weight"][:NUM_CLASSES], sd["classifier.weight"])
    assert_same(got, sd, skip={"classifier.weight", "classifier.bias"})
    text = caplog.text
    n = len(sd) - 2
    assert f"{n} tensors loaded, 0 resized, 2 skipped" in text
    assert "classifier.weight: another number of identities, checkpoint (6, 64) vs model (9, 64)" in text
    n_backbone = sum(k.startswith("base_model.") for k in sd)
    assert f"backbone: {n_backbone} loaded\n" in text and f"cross-modal: {n - n_backbone} loaded\n" in text
    assert "classifier: 2 skipped (other shape)" in text


def test_other_text_length_resizes_text_pos_embed(saved):
    path, sd = saved
    key = "base_model.positional_embedding"
    short = build_model(tiny_args(pretrain_choice=path, text_length=40), NUM_CLASSES).state_dict()
    assert torch.equal(short[key], sd[key][:40])
    long = build_model(tiny_args(pretrain_choice=path, text_length=100), NUM_CLASSES).state_dict()
    assert long[key].shape == (100, 64)
    torch.testing.assert_close(long[key], resize_text_pos_embed(sd[key], 100))
    # independently: linear interpolation along the 77 positions
    ref = torch.nn.functional.interpolate(sd[key].t()[None], size=100, mode="linear", align_corners=False)[0].t()
    torch.testing.assert_close(long[key], ref)
    assert_same(long, sd, skip={key})


def test_other_losses_load_the_common_part(saved, caplog):
    """A model without MLM / ID skips those tensors of the checkpoint; one with itc keeps what it shares."""
    path, sd = saved
    with caplog.at_level(logging.INFO, logger="IRRA"):
        got = build_model(tiny_args(pretrain_choice=path, loss_names="sdm"), NUM_CLASSES).state_dict()
    assert all(k.startswith("base_model.") for k in got)
    assert_same(got, {k: v for k, v in sd.items() if k in got})
    n_skipped = sum(not k.startswith("base_model.") for k in sd)
    assert f"0 skipped, 0 of this model not in the checkpoint (kept at their initialisation), {n_skipped} not in this " \
           f"model" in caplog.text
    assert "classifier: 2 not in the model (classifier.weight, classifier.bias)" in caplog.text
    assert f"cross-modal: {n_skipped - 2} not in the model (cross_attn." in caplog.text


def test_modules_absent_from_the_checkpoint_start_fresh(saved, tmp_path, caplog):
    """A checkpoint trained with sdm only: the MLM modules and classifier of an sdm+mlm+id model keep their init."""
    _, sd = saved
    path = str(tmp_path / "sdm_only.pth")
    torch.save({"model": {k: v for k, v in sd.items() if k.startswith("base_model.")}}, path)
    torch.manual_seed(5)
    plain = build_model(tiny_args(), NUM_CLASSES).state_dict()
    torch.manual_seed(5)
    with caplog.at_level(logging.INFO, logger="IRRA"):
        got = build_model(tiny_args(pretrain_choice=path), NUM_CLASSES).state_dict()
    fresh = [k for k in got if not k.startswith("base_model.")]
    for k in got:
        assert torch.equal(got[k], plain[k] if k in fresh else sd[k]), k
    assert f"0 skipped, {len(fresh)} of this model not in the checkpoint" in caplog.text
    assert "classifier: 2 not in the checkpoint (classifier.weight, classifier.bias)" in caplog.text
    assert f"cross-modal: {len(fresh) - 2} not in the checkpoint" in caplog.text


def test_clip_file_is_not_an_irra_checkpoint(saved, tmp_path, caplog):
    """A CLIP state dict (no base_model.*) builds the backbone only, as before; nothing else is loaded."""
    _, sd = saved
    clip_sd = {k[len("base_model."):]: v for k, v in sd.items() if k.startswith("base_model.")}
    path = str(tmp_path / "clip.pt")
    torch.save(clip_sd, path)
    torch.manual_seed(3)
    with caplog.at_level(logging.INFO, logger="IRRA"):
        got = build_model(tiny_args(pretrain_choice=path), NUM_CLASSES).state_dict()
    torch.manual_seed(3)
    plain = build_model(tiny_args(), NUM_CLASSES).state_dict()
    for k in got:
        if k.startswith("base_model."):
            assert torch.equal(got[k], sd[k]), k
        else:
            assert torch.equal(got[k], plain[k]), k
    assert "IRRA checkpoint" not in caplog.text


def _bad_files(tmp_path, saved):
    path, _ = saved
    data = open(path, "rb").read()
    files = {"empty": b"", "truncated": data[: len(data) // 2], "random": random.Random(0).randbytes(4096)}
    out = {}
    for name, content in files.items():
        out[name] = str(tmp_path / f"{name}.pth")
        with open(out[name], "wb") as f:
            f.write(content)
    return out


@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
def test_unreadable_file_is_a_clear_error(saved, tmp_path, kind):
    path = _bad_files(tmp_path, saved)[kind]
    with pytest.raises(CheckpointReadError) as err:
        build_model(tiny_args(pretrain_choice=path), NUM_CLASSES)
    msg = str(err.value)
    assert path in msg and "not a readable torch checkpoint" in msg and "weights_only" not in msg
    if kind == "random":
        assert "Python objects" not in msg  # random bytes are corrupt, not an unsafe pickle


def test_end_to_end_fine_tuning(saved, tiny_cuhk_root, tmp_path):
    """train.main from the saved checkpoint (6 identities; the tiny dataset has 8: the classifier starts fresh)."""
    path, _ = saved
    result = train.main(tiny_train_argv(tiny_cuhk_root, str(tmp_path / "logs"), "--pretrain_choice", path,
                                        "--num_epoch", "1"))
    run_dir = result["run_dir"]
    assert os.path.isfile(os.path.join(run_dir, "best.pth"))
    log = open(os.path.join(run_dir, "train_log.txt")).read()
    assert f"fine-tuning from the IRRA checkpoint {path}" in log
    assert "classifier.weight: another number of identities, checkpoint (6, 64) vs model (8, 64)" in log
    trained = torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)["model"]
    assert trained["classifier.weight"].shape == (8, 64)
