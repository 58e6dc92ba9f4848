"""Tiny IRRA models (ViT and ResNet backbones) train end to end with all five losses."""
import argparse

import pytest

from utils.options import default_args
import torch

from methods.irra.options import LOSSES as VALID_LOSSES
from model.build import build_model
from utils.choices import parse_loss_names
from tests.conftest import make_batch

NUM_CLASSES = 4


def make_args(**over):
    fields = dict(pretrain_choice="scratch:ViT-Micro", img_size=(64, 32), stride_size=16, temperature=0.02,
                  loss_names="sdm+itc+cmpm+id+mlm", cmt_depth=1, vocab_size=49408, id_loss_weight=1.0,
                  mlm_loss_weight=1.0, text_length=77, precision="fp32", device="cpu",
                  grad_checkpointing=False)
    fields.update(over)
    return default_args(**fields)


def _train_step_grads(model, batch):
    model.train()
    ret = model(batch)
    for k in ("itc_loss", "sdm_loss", "cmpm_loss", "id_loss", "mlm_loss", "img_acc", "txt_acc", "mlm_acc", "temperature"):
        assert k in ret and torch.isfinite(ret[k]), k
    loss = sum(v for k, v in ret.items() if "loss" in k)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    return ret


@pytest.mark.parametrize("arch,tokens", [("scratch:ViT-Micro", 1 + 4 * 2), ("scratch:RN-Tiny", 1 + 2 * 1)])
def test_tiny_irra_all_losses_backward(arch, tokens):
    torch.manual_seed(0)
    model = build_model(make_args(pretrain_choice=arch), NUM_CLASSES)
    batch = make_batch()
    image_feats, _ = model.base_model(batch["images"], batch["caption_ids"])
    assert image_feats.shape == (4, tokens, model.embed_dim)
    assert model.encode_image(batch["images"]).shape == (4, model.embed_dim)
    assert model.encode_text(batch["caption_ids"]).dtype == torch.float32
    _train_step_grads(model, batch)
    assert "logit_scale" not in model.state_dict()


@pytest.mark.parametrize("text_length", [64, 100])
def test_text_length(text_length):
    torch.manual_seed(0)
    model = build_model(make_args(text_length=text_length, loss_names="sdm+mlm"), NUM_CLASSES)
    assert model.base_model.positional_embedding.shape[0] == text_length
    ret = model(make_batch(length=text_length))
    assert torch.isfinite(ret["sdm_loss"]) and torch.isfinite(ret["mlm_loss"])


def test_loss_names_validation():
    assert parse_loss_names(" sdm + id+mlm ", VALID_LOSSES) == ["sdm", "id", "mlm"]
    with pytest.raises(ValueError) as err:
        build_model(make_args(loss_names="sdm+foo"), NUM_CLASSES)
    assert "foo" in str(err.value) and all(n in str(err.value) for n in VALID_LOSSES)


def test_unknown_pretrain_choice():
    with pytest.raises(ValueError, match="scratch:ViT-Micro"):
        build_model(make_args(pretrain_choice="scratch:ViT-Huge"), NUM_CLASSES)
    with pytest.raises(ValueError, match="ViT-B/16"):
        build_model(make_args(pretrain_choice="no/such/file.pt"), NUM_CLASSES)


def test_optional_modules_follow_losses():
    model = build_model(make_args(loss_names="itc"), NUM_CLASSES)
    assert not hasattr(model, "classifier") and not hasattr(model, "mlm_head")
    ret = model(make_batch())
    assert set(ret) == {"temperature", "itc_loss"}


def test_mlm_without_mlm_batch_is_clear_error():
    model = build_model(make_args(loss_names="mlm"), NUM_CLASSES)
    b = make_batch()
    del b["mlm_ids"]
    with pytest.raises(KeyError, match="--MLM"):
        model(b)


def test_precision_rule_on_the_cpu():
    """auto keeps fp32 weights for the CPU; fp16 converts (the original's convert_weights) wherever the model goes."""
    auto = build_model(make_args(precision="auto"), NUM_CLASSES, device=torch.device("cpu"))
    assert auto.classifier.weight.dtype == torch.float32
    fp16 = build_model(make_args(precision="fp16"), NUM_CLASSES, device=torch.device("cpu"))
    assert fp16.classifier.weight.dtype == torch.float16
