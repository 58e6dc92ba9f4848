"""IRRA forward vs the original implementation's outputs (tests/fixtures/model_forward.pt)."""
import argparse
import copy
import os
import sys

import pytest

from utils.options import default_args
import torch

from model.build import build_model
from model.clip_model import convert_weights
from utils.checkpoint import Checkpointer

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
sys.path.insert(0, FIX)
import tinyckpt  # noqa: E402


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(FIX, "model_forward.pt"), weights_only=True)


@pytest.fixture(scope="module")
def files(golden, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    clip_path = str(d / "tiny_clip.pt")
    tinyckpt.save_openai_clip(clip_path, tinyckpt.load_spec(os.path.join(FIX, "clip_spec.json")), seed=golden["clip_seed"])
    irra_sd = tinyckpt.make_state_dict(tinyckpt.load_spec(os.path.join(FIX, "irra_spec.json")), seed=golden["irra_seed"])
    irra_path = str(d / "irra.pth")
    torch.save({"model": irra_sd, "epoch": 3}, irra_path)
    ddp_path = str(d / "irra_ddp.pth")
    torch.save({"model": {"module." + k: v for k, v in irra_sd.items()}, "epoch": 3}, ddp_path)
    return clip_path, irra_path, ddp_path


def make_args(golden, clip_path, **over):
    fields = dict(golden["args"])
    fields.update(pretrain_choice=clip_path, **over)
    return default_args(**fields)


@pytest.fixture(scope="module")
def model(golden, files):
    m = build_model(make_args(golden, files[0]), golden["num_classes"])
    torch.testing.assert_close(m.base_model.visual.positional_embedding.detach(), golden["base_pos_embed_after_resize"],
                               rtol=1e-5, atol=1e-7)
    extra = Checkpointer(m).load(files[1])
    assert extra == {"epoch": 3}
    return m.eval()


@pytest.fixture(scope="module")
def batch(golden):
    b = dict(golden["batch"])
    b["images"] = torch.randn(*golden["image_shape"], generator=torch.Generator().manual_seed(golden["image_seed"]))
    return b


def _check(m, batch, exp, rtol, atol):
    with torch.no_grad():
        image_feats, text_feats = m.base_model(batch["images"], batch["caption_ids"])
        torch.testing.assert_close(image_feats.float(), exp["image_feats"], rtol=rtol, atol=atol)
        torch.testing.assert_close(text_feats.float(), exp["text_feats"], rtol=rtol, atol=atol)
        torch.testing.assert_close(m.encode_image(batch["images"]), exp["i_feats"], rtol=rtol, atol=atol)
        torch.testing.assert_close(m.encode_text(batch["caption_ids"]), exp["t_feats"], rtol=rtol, atol=atol)
        ret = m(batch)
    assert set(ret) == set(exp["ret"])
    for k, v in exp["ret"].items():
        assert float(ret[k]) == pytest.approx(float(v), rel=rtol, abs=atol), k
    return ret


def test_fp32_forward_matches_original(model, batch, golden):
    assert model.fast
    _check(model, batch, golden["fp32"], rtol=1e-5, atol=1e-5)


def test_fast_path_equals_full_path(model, batch, golden):
    with torch.no_grad():
        fast = model(batch)
        model.fast = False
        try:
            full = model(batch)
        finally:
            model.fast = True
    for k in full:
        assert float(fast[k]) == pytest.approx(float(full[k]), rel=1e-5, abs=1e-6), k
        assert float(full[k]) == pytest.approx(float(golden["fp32"]["ret"][k]), rel=1e-5, abs=1e-5), k


def test_cutting_mlm_ids_would_change_mlm_loss(model, batch):
    """Why mlm_ids stay full length: the cross-modal transformer attends over the padding too."""
    b = dict(batch)
    length = int(b["caption_ids"].argmax(-1).max()) + 1
    assert length < b["mlm_ids"].shape[1]
    b["mlm_ids"], b["mlm_labels"] = b["mlm_ids"][:, :length], b["mlm_labels"][:, :length]
    with torch.no_grad():
        cut = model(b)["mlm_loss"]
        full = model(batch)["mlm_loss"]
    assert abs(float(cut) - float(full)) > 1e-4


def test_ddp_prefixed_checkpoint_loads(golden, files, batch):
    m = build_model(make_args(golden, files[0]), golden["num_classes"]).eval()
    Checkpointer(m).load(files[2])
    with torch.no_grad():
        ret = m(batch)
    assert float(ret["sdm_loss"]) == pytest.approx(float(golden["fp32"]["ret"]["sdm_loss"]), rel=1e-5)


def test_fp16_forward_matches_original(model, batch, golden):
    m = copy.deepcopy(model)
    convert_weights(m)
    assert m.classifier.weight.dtype == torch.float16 and m.base_model.dtype == torch.float16
    assert m.base_model.token_embedding.weight.dtype == torch.float32  # embeddings stay fp32 as OpenAI's rule
    _check(m, batch, golden["fp16"], rtol=2e-2, atol=2e-2)


def test_build_model_precision_rule(golden, files):
    fp16 = build_model(make_args(golden, files[0], precision="fp16"), golden["num_classes"])
    assert fp16.base_model.visual.conv1.weight.dtype == torch.float16
    auto_cpu = build_model(make_args(golden, files[0], precision="auto", device="cpu"), golden["num_classes"])
    assert auto_cpu.base_model.visual.conv1.weight.dtype == torch.float32
    amp = build_model(make_args(golden, files[0], precision="amp_bf16"), golden["num_classes"])
    assert amp.classifier.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        build_model(make_args(golden, files[0], precision="int8"), golden["num_classes"])
