"""Hackable CLIP: positional-embedding resizing, non-square encoders, weight files, download."""
import hashlib
import io
import json
import os
import re
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import pretrained
from model.clip_model import (CLIP, ModifiedResNet, VisionTransformer, available_models,
                              build_CLIP_from_openai_pretrained, resize_pos_embed, resize_text_pos_embed)
from model.pretrained import load_clip_state_dict

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def small_clip(vocab=300, context=20, image=(64, 32)):
    torch.manual_seed(0)
    # embed 64, 1 vision layer of width 64, patch 16, text width 64 / 1 head / 1 layer
    return CLIP(64, image, 1, 64, 16, 16, context, vocab, 64, 1, 1)


# ------------------------------------------------------------------ positional embeddings
def test_resize_pos_embed_fixture():
    with open(os.path.join(FIX, "functions.json")) as f:
        d = json.load(f)["resize_pos_embed"]
    posemb = torch.tensor(d["in"])
    out = resize_pos_embed(posemb, torch.zeros(1 + d["h"] * d["w"], posemb.shape[1]), d["h"], d["w"])
    assert out.shape == (1 + d["h"] * d["w"], posemb.shape[1])
    torch.testing.assert_close(out, torch.tensor(d["out"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0], posemb[0])


def test_resize_text_pos_embed_shorter_and_longer():
    pe = torch.randn(77, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(resize_text_pos_embed(pe, 64), pe[:64])
    longer = resize_text_pos_embed(pe, 100)
    assert longer.shape == (100, 8)
    # naive 1-D linear interpolation, align_corners=False (half-pixel centres, clamped at the borders)
    scale = 77 / 100
    for i in (0, 1, 37, 50, 98, 99):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(src), 76)
        hi = min(lo + 1, 76)
        w = src - lo
        torch.testing.assert_close(longer[i], (1 - w) * pe[lo] + w * pe[hi], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ encoders
def test_vision_transformer_non_square_all_tokens():
    vit = VisionTransformer((64, 32), patch_size=16, stride_size=16, width=64, layers=1, heads=1, output_dim=32)
    assert (vit.num_y, vit.num_x) == (4, 2)
    assert vit(torch.randn(2, 3, 64, 32)).shape == (2, 1 + 4 * 2, 32)
    overlap = VisionTransformer((64, 32), patch_size=16, stride_size=8, width=64, layers=1, heads=1, output_dim=32)
    assert (overlap.num_y, overlap.num_x) == (7, 3)
    assert overlap(torch.randn(1, 3, 64, 32)).shape == (1, 22, 32)


def test_modified_resnet_tokens_and_pooled_token():
    torch.manual_seed(0)
    rn = ModifiedResNet((1, 1, 1, 1), output_dim=48, heads=2, input_resolution=(96, 64), width=8).eval()
    x = torch.randn(2, 3, 96, 64)
    out = rn(x)
    assert out.shape == (2, 1 + 3 * 2, 48)
    # token 0 == CLIP's pooled output (attention with the mean token as the only query)
    with torch.no_grad():
        f = rn.relu1(rn.bn1(rn.conv1(x)))
        f = rn.relu2(rn.bn2(rn.conv2(f)))
        f = rn.avgpool(rn.relu3(rn.bn3(rn.conv3(f))))
        f = rn.layer4(rn.layer3(rn.layer2(rn.layer1(f))))
        p = rn.attnpool
        t = f.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
        t = torch.cat([t.mean(dim=0, keepdim=True), t], dim=0) + p.positional_embedding[:, None, :]
        pooled, _ = F.multi_head_attention_forward(
            query=t[:1], key=t, value=t, embed_dim_to_check=t.shape[-1], num_heads=p.num_heads,
            q_proj_weight=p.q_proj.weight, k_proj_weight=p.k_proj.weight, v_proj_weight=p.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([p.q_proj.bias, p.k_proj.bias, p.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=p.c_proj.weight,
            out_proj_bias=p.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    torch.testing.assert_close(out[:, 0], pooled.squeeze(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 32"):
        ModifiedResNet((1, 1, 1, 1), 48, 2, input_resolution=(100, 64), width=8)


def test_encode_text_shorter_than_context_is_identical():
    model = small_clip().eval()
    text = torch.randint(1, 299, (3, 20))
    with torch.no_grad():
        full = model.encode_text(text)
        short = model.encode_text(text[:, :9])
    assert full.shape == (3, 20, 64) and short.shape == (3, 9, 64)
    torch.testing.assert_close(short, full[:, :9], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="context_length=20"):
        model.encode_text(torch.zeros(1, 21, dtype=torch.long))


def test_clip_forward_shapes():
    model = small_clip()
    img, txt = model(torch.randn(2, 3, 64, 32), torch.randint(0, 300, (2, 20)))
    assert img.shape == (2, 9, 64) and txt.shape == (2, 20, 64)
    assert "logit_scale" not in model.state_dict()


# ------------------------------------------------------------------ weight files
class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _holder_from_state_dict(sd):
    """An nn.Module tree whose state dict is ``sd`` (to write a TorchScript archive like OpenAI's)."""
    root = _Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, _Holder())
            m = getattr(m, part)
        m.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    return root


@pytest.fixture(scope="module")
def source_sd():
    """OpenAI-format state dict of a 224x224 CLIP (14x14 grid), fp16 like OpenAI's archives, + logit_scale."""
    sd = {k: v.half() for k, v in small_clip(image=(224, 224)).state_dict().items()}
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "state_dict", "wrapped_state_dict", "wrapped_model"])
def test_build_from_file_formats(tmp_path, source_sd, fmt):
    path = str(tmp_path / "clip.pt")
    if fmt == "torchscript":
        torch.jit.script(_holder_from_state_dict(source_sd)).save(path)
    elif fmt == "state_dict":
        torch.save(source_sd, path)
    elif fmt == "wrapped_state_dict":
        torch.save({"state_dict": source_sd}, path)
    else:
        torch.save({"model": source_sd, "epoch": 1}, path)
    loaded = load_clip_state_dict(path)
    assert set(loaded) == set(source_sd)
    model, cfg = build_CLIP_from_openai_pretrained(path, (64, 32), 16)
    assert cfg["embed_dim"] == 64 and cfg["vision_layers"] == 1 and cfg["vocab_size"] == 300
    assert cfg["image_resolution"] == (64, 32) and cfg["context_length"] == 20
    sd = model.state_dict()
    assert sd["token_embedding.weight"].dtype == torch.float32
    torch.testing.assert_close(sd["token_embedding.weight"], source_sd["token_embedding.weight"].float())
    torch.testing.assert_close(sd["transformer.resblocks.0.attn.in_proj_weight"],
                               source_sd["transformer.resblocks.0.attn.in_proj_weight"].float())
    expected_pos = resize_pos_embed(source_sd["visual.positional_embedding"].float(), sd["visual.positional_embedding"], 4, 2)
    torch.testing.assert_close(sd["visual.positional_embedding"], expected_pos, rtol=1e-3, atol=1e-3)


def test_build_text_length_resizes_text_pos(tmp_path, source_sd):
    path = str(tmp_path / "clip.pt")
    torch.save(source_sd, path)
    short, cfg = build_CLIP_from_openai_pretrained(path, (64, 32), 16, text_length=12)
    assert cfg["context_length"] == 12 and short.transformer.resblocks[0].attn_mask.shape == (12, 12)
    torch.testing.assert_close(short.positional_embedding.data, source_sd["positional_embedding"][:12].float())
    long, _ = build_CLIP_from_openai_pretrained(path, (64, 32), 16, text_length=30)
    assert long.positional_embedding.shape == (30, 64)
    assert long.encode_text(torch.randint(0, 300, (1, 30))).shape == (1, 30, 64)


def test_resnet_attnpool_pos_embed_resized_on_load(tmp_path):
    torch.manual_seed(0)
    # ModifiedResNet CLIP trained at 64x64 (2x2 attnpool grid), loaded for 96x64 inputs (3x2 grid)
    src = CLIP(32, (64, 64), (1, 1, 1, 1), 8, None, 16, 20, 300, 64, 1, 1)
    sd = src.state_dict()
    torch.save(sd, tmp_path / "rn.pt")
    model, cfg = build_CLIP_from_openai_pretrained(str(tmp_path / "rn.pt"), (96, 64), 16)
    assert cfg["vision_layers"] == (1, 1, 1, 1) and cfg["vision_width"] == 8 and cfg["vision_patch_size"] is None
    pos = model.visual.attnpool.positional_embedding
    assert pos.shape == (1 + 3 * 2, 256)
    torch.testing.assert_close(pos.data, resize_pos_embed(sd["visual.attnpool.positional_embedding"], pos, 3, 2))
    torch.testing.assert_close(model.visual.layer1[0].conv1.weight.data, sd["visual.layer1.0.conv1.weight"])
    assert model.encode_image(torch.randn(1, 3, 96, 64)).shape == (1, 7, 32)


def test_load_param_shape_mismatch_is_error(source_sd):
    model = small_clip()
    bad = {k: v for k, v in source_sd.items() if not k.startswith("visual.positional")}
    bad["ln_final.weight"] = torch.ones(32)
    with pytest.raises(ValueError, match="ln_final.weight"):
        model.load_param(bad)
    missing = {k: v for k, v in source_sd.items() if k != "text_projection"}
    with pytest.raises(ValueError, match="text_projection"):
        small_clip(image=(224, 224)).load_param(missing)


def test_unknown_names():
    with pytest.raises(ValueError, match="ViT-B/16"):
        build_CLIP_from_openai_pretrained("ViT-Z/99", (64, 32), 16)
    with pytest.raises(ValueError, match="scratch:ViT-Tiny"):
        build_CLIP_from_openai_pretrained("scratch:Nope", (64, 32), 16)


def test_scratch_archs():
    vit, cfg = build_CLIP_from_openai_pretrained("scratch:ViT-Micro", (64, 32), 16, text_length=24)
    assert cfg["embed_dim"] == 64 and cfg["context_length"] == 24
    assert vit.encode_image(torch.randn(1, 3, 64, 32)).shape == (1, 9, 64)
    rn, _ = build_CLIP_from_openai_pretrained("scratch:RN-Tiny", (64, 32), 16)
    assert isinstance(rn.visual, ModifiedResNet)
    assert rn.encode_image(torch.randn(1, 3, 64, 32)).shape == (1, 1 + 2 * 1, 128)


# ------------------------------------------------------------------ download
def test_every_named_model_is_a_checked_download(tmp_path, monkeypatch):
    """Each OpenAI name (README's list) leads, offline, to an error naming the cache file and a URL whose second-last
    component is a SHA256; a file already at that path is then accepted only with that SHA256."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", offline)
    cache = tmp_path / "cache"
    names = available_models()
    assert {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14",
            "ViT-L/14@336px"} <= set(names)
    for name in names:
        with pytest.raises(FileNotFoundError) as err:
            build_CLIP_from_openai_pretrained(name, (64, 32), 16, download_root=str(cache))
        found = re.search(r"fetch https://\S+/([0-9a-f]{64})/([\w.@-]+\.pt) by hand and place it at (\S+) ",
                          str(err.value))
        assert found, (name, str(err.value))
        sha, filename, target = found.groups()
        assert target == str(cache / filename)
        cache.mkdir(exist_ok=True)
        (cache / filename).write_bytes(b"not the weights")
        with pytest.raises(RuntimeError, match=f"does not match the expected {sha}"):
            build_CLIP_from_openai_pretrained(name, (64, 32), 16, download_root=str(cache))


def test_download_sha_mismatch_is_error(tmp_path):
    url = "https://example.invalid/clip/models/" + "0" * 64 + "/Tiny.pt"
    (tmp_path / "Tiny.pt").write_bytes(b"not the weights")
    with pytest.raises(RuntimeError, match="SHA256"):
        pretrained._download(url, str(tmp_path))


def test_download_offline_names_path_and_url(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", offline)
    url = pretrained._MODELS["ViT-B/16"]
    with pytest.raises(FileNotFoundError) as err:
        pretrained._download(url, str(tmp_path / "cache"))
    msg = str(err.value)
    assert str(tmp_path / "cache" / "ViT-B-16.pt") in msg and url in msg
    assert not list((tmp_path / "cache").glob("*"))  # no partial file left
    with pytest.raises(FileNotFoundError, match="ViT-B-16.pt"):
        build_CLIP_from_openai_pretrained("ViT-B/16", (64, 32), 16, download_root=str(tmp_path / "cache"))


class _FakeResponse(io.BytesIO):
    def info(self):
        return {"Content-Length": str(len(self.getvalue()))}


def test_download_success_and_corrupt_download(tmp_path, monkeypatch):
    payload = b"clip weights" * 1000
    sha = hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(payload))
    path = pretrained._download(f"https://example.invalid/m/{sha}/W.pt", str(tmp_path))
    assert path == str(tmp_path / "W.pt") and open(path, "rb").read() == payload
    # cached: no second fetch
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda *a, **k: pytest.fail("re-downloaded"))
    assert pretrained._download(f"https://example.invalid/m/{sha}/W.pt", str(tmp_path)) == path
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"corrupt"))
    with pytest.raises(RuntimeError, match="does not match"):
        pretrained._download(f"https://example.invalid/m/{sha}/X.pt", str(tmp_path))
    assert not (tmp_path / "X.pt").exists()
