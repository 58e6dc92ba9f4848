"""TBPS-CLIP's model against TBPS's own code (tests/fixtures/tbps/tbps_model.pt and tbps_checkpoint.pth, see the
README there): the losses of each variant and alpha, gradient norms, conv1 frozen, the eval encodings; and reading
TBPS checkpoints."""
import math
import os

import pytest
import torch

from methods.tbps.checkpoint import (arch_from_state_dict, build_tbps, clip_to_tbps_state_dict, is_tbps_state_dict,
                                     load_tbps_weights, read_tbps_checkpoint)
from methods.tbps.model import TBPS, TBPSLossConfig, sum_losses
from model.tbps_model import tokenize
from utils.checkpoint import CheckpointReadError

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "tbps")
CKPT = os.path.join(HERE, "tbps_checkpoint.pth")
VARIANTS = {"all": TBPSLossConfig(),
            "nitc_only": TBPSLossConfig(mvs_image=False, ss=False, citc=False, ritc=False),
            "with_id": TBPSLossConfig(id=True)}


@pytest.fixture(scope="module")
def fx():
    return torch.load(os.path.join(HERE, "tbps_model.pt"), weights_only=True)


@pytest.fixture(scope="module")
def sd():
    return read_tbps_checkpoint(CKPT)


def build(sd, losses=None, img_size=(64, 32), dropout=0.0):
    # the fixture's model has 2 heads of width 32 (heads cannot be read from weights: head_width says it)
    model = TBPS(arch_from_state_dict(sd, img_size, head_width=32), losses or TBPSLossConfig(), dropout=dropout)
    load_tbps_weights(model, sd, source=CKPT)
    return model


def batch_of(fx):
    b = fx["batch"]
    return {"image": b["image"], "aug1": b["aug1"], "aug_ss_1": b["aug_ss_1"], "aug_ss_2": b["aug_ss_2"],
            "caption_ids": tokenize(b["caption"], 77), "id": b["id"]}


def grad_norm(model, prefix):
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for n, p in model.named_parameters()
                         if n.startswith(prefix) and p.grad is not None))


def test_arch_inferred_from_the_weights(fx, sd):
    arch = arch_from_state_dict(sd, (64, 32), head_width=32)
    spec = fx["spec"]
    assert (arch.vision_width, arch.vision_layers, arch.vision_heads, arch.patch_size) == (
        spec["vision"]["width"], spec["vision"]["layers"], spec["vision"]["heads"], spec["vision"]["patch_size"])
    assert (arch.text_width, arch.text_layers, arch.text_heads, arch.context_length) == (
        spec["text"]["width"], spec["text"]["layers"], spec["text"]["heads"], spec["text"]["context_length"])
    assert arch.embed_dim == spec["embed_dim"] and arch.num_classes == spec["num_classes"]
    assert list(arch.simclr_mlp) == spec["simclr_mlp"]
    assert arch_from_state_dict(sd, (64, 32)).vision_heads == 1  # CLIP's rule: width // 64


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_losses_and_gradients_match_tbps(fx, sd, variant):
    for alpha in (0.0, 0.5):
        want = fx["results"][f"{variant} alpha={alpha}"]
        model = build(sd, VARIANTS[variant])
        model.train()
        ret = model(batch_of(fx), alpha)
        assert set(ret) == set(want["losses"]) | {"temperature"}
        assert ret["temperature"].item() == pytest.approx(0.07, rel=1e-6)
        for k, v in want["losses"].items():
            assert ret[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), (variant, alpha, k)
        sum_losses(ret).backward()
        assert grad_norm(model, "visual.") == pytest.approx(want["grad_norm_visual"], rel=1e-5)
        assert grad_norm(model, "encode_text.") == pytest.approx(want["grad_norm_text"], rel=1e-5)
        assert (model.visual.conv1.weight.grad is not None) == want["conv1_grad"] is False
        assert model.scale().item() == pytest.approx(want["logit_scale_after"], rel=1e-6)


def test_host_side_caption_cut_gives_the_same_losses(fx, sd):
    model = build(sd)
    batch = batch_of(fx)
    with torch.no_grad():
        a = model(batch, 0.5)
        b = model({**batch, **model.host_lengths(batch)}, 0.5)
    assert model.host_lengths(batch)["caption_cut"] < 77
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_conv1_is_not_updated_by_a_step(fx, sd):
    model = build(sd)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.02)
    sum_losses(model(batch_of(fx), 0.5)).backward()
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    assert not torch.equal(before["visual.proj"], after["visual.proj"])
    assert not model.visual.conv1.weight.requires_grad


def test_eval_encodings_match_tbps(fx, sd):
    model = build(sd, dropout=0.05).eval()
    b = batch_of(fx)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(b["image"]), torch.tensor(fx["results"]["encode_image"]),
                                   atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(b["caption_ids"]), torch.tensor(fx["results"]["encode_text"]),
                                   atol=2e-5, rtol=1e-5)
        # dropout is off in eval; the unfused attention path gives the same features
        model.set_fused_attention(False)
        torch.testing.assert_close(model.encode_text(b["caption_ids"]), torch.tensor(fx["results"]["encode_text"]),
                                   atol=2e-5, rtol=1e-5)


def test_text_dropout_is_active_in_training_only(fx, sd):
    model = build(sd, VARIANTS["nitc_only"], dropout=0.5)
    ids = batch_of(fx)["caption_ids"]
    model.train()
    torch.manual_seed(0)
    a = model.encode_text(ids)
    b = model.encode_text(ids)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model.encode_text(ids), model.encode_text(ids))
    assert all(blk.attn.dropout == 0.0 for blk in model.encode_text.transformer.resblocks)


def test_checkpoint_loads_at_another_image_size(sd):
    model = build(sd, img_size=(96, 32))  # 4x2 grid -> 6x2: bilinear resize of the positional embedding
    assert model.visual.positional_embedding.shape == (1 + 6 * 2, 64)
    assert torch.equal(model.visual.positional_embedding[0], sd["visual.positional_embedding"][0])
    with torch.no_grad():
        assert model.encode_image(torch.zeros(2, 3, 96, 32)).shape == (2, 32)


def test_checkpoint_reading_errors(tmp_path, sd):
    bad = tmp_path / "irra.pth"
    torch.save({"model": {"base_model.visual.proj": torch.zeros(2, 2)}}, bad)
    with pytest.raises(CheckpointReadError, match="not a TBPS-CLIP checkpoint"):
        read_tbps_checkpoint(str(bad))
    ddp = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, ddp)
    assert set(read_tbps_checkpoint(str(ddp))) == set(sd)
    assert is_tbps_state_dict(sd) and not is_tbps_state_dict({"visual.proj": 0})
    partial = {k: v for k, v in sd.items() if k != "visual.ln_post.weight"}
    with pytest.raises(ValueError, match="lacks 1 weights"):
        build(partial)


def test_openai_clip_keys_map_to_tbps_keys(sd):
    clip = {k[len("encode_text."):] if k.startswith("encode_text.") else k: v for k, v in sd.items()
            if not k.startswith(("simclr_mlp", "classifier"))}
    clip["positional_embedding"] = sd["encode_text.positional_embedding"][:40]
    clip["context_length"] = torch.tensor(40)
    mapped = clip_to_tbps_state_dict(clip, 77)
    assert "context_length" not in mapped and "encode_text.transformer.resblocks.0.ln_1.weight" in mapped
    assert mapped["encode_text.positional_embedding"].shape == (77, 64) and "logit_scale" in mapped
    model = TBPS(arch_from_state_dict(mapped, (64, 32), head_width=32), TBPSLossConfig(ss=False), dropout=0.0)
    load_tbps_weights(model, mapped)
    assert model.scale().item() == pytest.approx(math.exp(float(sd["logit_scale"])), rel=1e-6)


def test_build_from_scratch_checkpoint_and_new_heads(sd):
    with pytest.raises(ValueError, match="simclr_mlp"):
        build_tbps("scratch:ViT-Micro", (64, 32), TBPSLossConfig())
    arch_dim = build_tbps("scratch:ViT-Micro", (64, 32), TBPSLossConfig(ss=False)).embed_dim
    m = build_tbps("scratch:ViT-Micro", (64, 32), TBPSLossConfig(id=True), simclr_mlp=(arch_dim, 16, arch_dim),
                   num_classes=5)
    assert m.classifier.out_features == 5 and not m.visual.conv1.weight.requires_grad
    assert m.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    # a TBPS checkpoint: its weights; a classifier of another size is made anew
    m = build_tbps(CKPT, (64, 32), TBPSLossConfig(id=True), head_width=32, num_classes=3, dropout=0.0)
    assert m.classifier.out_features == 3
    assert torch.equal(m.visual.proj, sd["visual.proj"])
    assert torch.equal(m.simclr_mlp[0].weight, sd["simclr_mlp.0.weight"])


EASYDICT = '''
class EasyDict(dict):
    def __init__(self, d=None):
        for k, v in (d or {}).items():
            setattr(self, k, v)

    def __setattr__(self, name, value):
        if isinstance(value, dict) and not isinstance(value, self.__class__):
            value = self.__class__(value)
        super().__setattr__(name, value)
        super().__setitem__(name, value)
'''


def test_tbps_training_checkpoint_with_easydict_config_reads_safely(tmp_path, monkeypatch, sd):
    """TBPS's main.py saves {"model", "optimizer", "config": EasyDict}: weights_only=True refuses it; the
    whitelisting unpickler reads it (easydict need not be installed) and refuses any other global."""
    import sys

    from methods.tbps.safe_load import load_tbps_file
    (tmp_path / "easydict.py").write_text(EASYDICT)
    monkeypatch.syspath_prepend(str(tmp_path))
    import easydict
    cfg = easydict.EasyDict({"model": {"embed_dim": 32}, "experiment": {"simclr_mlp": [32, 16, 32]}})
    path = tmp_path / "checkpoint_best.pth"
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    torch.save({"model": sd, "optimizer": opt.state_dict(), "config": cfg}, path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.pth"
    torch.save({"model": sd, "config": cfg, "x": Evil()}, bad)
    monkeypatch.delitem(sys.modules, "easydict")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    got = read_tbps_checkpoint(str(path))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert load_tbps_file(str(path))["config"]["model"]["embed_dim"] == 32
    with pytest.raises(CheckpointReadError, match="not allowed"):
        read_tbps_checkpoint(str(bad))
