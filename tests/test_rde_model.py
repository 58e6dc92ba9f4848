"""The RDE model against RDE's own outputs on a tiny CLIP (tests/fixtures/rde/rde_model.pt), plus the builder's
dispatch, the checkpoint formats, the optimizer groups and the evaluation score."""
import copy
import json
import os
import sys

import pytest
import torch

from model.build import IRRA, RDE, build_model, build_model_from_checkpoint
from methods.rde.model import joint_features
from methods.registry import get_method
from model.build import checkpoint_methods
from solver.build import build_param_groups
from utils.options import default_args

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
sys.path.insert(0, FIX)
import tinyckpt  # noqa: E402


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(FIX, "rde", "rde_model.pt"), weights_only=True)


@pytest.fixture(scope="module")
def clip_file(golden, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rde") / "tiny_clip.pt")
    with open(os.path.join(FIX, "rde", "rde_clip_spec.json")) as f:
        tinyckpt.save_openai_clip(path, json.load(f), seed=golden["clip_seed"])
    return path


def rde_args(golden, clip_file, **over):
    a = dict(golden["args"])
    fields = dict(pretrain_choice=clip_file, img_size=tuple(a["img_size"]), stride_size=a["stride_size"],
                  temperature=a["temperature"], loss_names=a["loss_names"], select_ratio=a["select_ratio"],
                  tau=a["tau"], margin=a["margin"], precision="fp32", device="cpu")
    fields.update(over)
    return default_args(**fields)


@pytest.fixture(scope="module")
def model(golden, clip_file):
    m = build_model(rde_args(golden, clip_file), golden["num_classes"])
    assert isinstance(m, RDE)
    missing, unexpected = m.load_state_dict(golden["tse_state_dict"], strict=False)
    assert not unexpected and all(k.startswith("base_model.") for k in missing)
    return m


@pytest.fixture(scope="module")
def batch(golden):
    b = dict(golden["batch"])
    b["images"] = golden["images"]
    return b


def test_attribute_names_and_keys(model):
    assert model.loss_type == "TAL" and model.visul_emb_layer.fc.in_features == 512
    assert model.texual_emb_layer.linear.out_features == 1024
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"base_model", "visul_emb_layer", "texual_emb_layer"}


def test_last_block_attention(model, batch, golden):
    att = model.eval().last_block_attention(batch["images"], batch["caption_ids"])
    for k in ("image", "text"):
        torch.testing.assert_close(att[k], golden["last_block_attention"][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_per_loss_and_forward(model, batch, golden, mode):
    m = copy.deepcopy(model).train(mode == "train")
    with torch.no_grad():
        out = m.compute_per_loss(batch)
    for k, v in zip(("lossA", "lossB", "simsA", "simsB"), out):
        torch.testing.assert_close(v, golden[f"per_loss_{mode}"][k], atol=2e-6, rtol=1e-5)
    m = copy.deepcopy(model).train(mode == "train")
    ret = m(batch)
    (ret["bge_loss"] + ret["tse_loss"]).backward()
    exp = golden[f"forward_{mode}"]
    torch.testing.assert_close(ret["bge_loss"], exp["bge_loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret["tse_loss"], exp["tse_loss"], atol=1e-5, rtol=1e-5)
    norms = {"base": [], "tse": []}
    for n, p in m.named_parameters():
        if p.grad is not None:
            norms["base" if n.startswith("base_model.") else "tse"].append(p.grad.norm())
    torch.testing.assert_close(torch.stack(norms["base"]).norm(), exp["grad_norm_base"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(norms["tse"]).norm(), exp["grad_norm_tse"], atol=1e-5, rtol=1e-5)


def test_encoders(model, batch, golden):
    m = model.eval()
    e = golden["encode"]
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(batch["images"]), e["image"], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(m.encode_text(batch["caption_ids"]), e["text"], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(m.encode_image_tse(batch["images"]), e["image_tse"], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(m.encode_text_tse(batch["caption_ids"]), e["text_tse"], atol=2e-6, rtol=1e-5)
        # retrieval score = (S_bge + S_tse) / 2
        rde = get_method("rde")
        q = rde.encode_texts(m, batch["caption_ids"])[rde.default_feature_set]
        g = rde.encode_images(m, batch["images"])[rde.default_feature_set]
        cos = lambda a, b: torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).t()
        torch.testing.assert_close(q @ g.t(), (cos(e["text"], e["image"]) + cos(e["text_tse"], e["image_tse"])) / 2,
                                   atol=1e-5, rtol=1e-5)


def test_label_hat_weights_the_loss(model, batch):
    m = copy.deepcopy(model).eval()
    b = dict(batch, label_hat=torch.zeros(4))
    ret = m(b)
    assert float(ret["bge_loss"].detach()) == 0 and float(ret["tse_loss"].detach()) == 0
    full = m(dict(batch, label_hat=torch.ones(4)))
    none = m({k: v for k, v in batch.items() if k != "label_hat"})
    torch.testing.assert_close(full["bge_loss"], none["bge_loss"])


def test_builder_dispatch_and_errors():
    args = default_args(loss_names="tal", pretrain_choice="scratch:ViT-Micro", img_size=(64, 32), select_ratio=0.5,
                        tau=0.02, margin=0.2, tse_embed_dim=32)
    m = build_model(args, 3)
    assert isinstance(m, RDE) and m.tau == 0.02 and m.margin == 0.2 and m.visul_emb_layer.ratio == 0.5
    assert m.visul_emb_layer.fc.in_features == 64 and m.visul_emb_layer.fc.out_features == 32  # backbone's width
    assert isinstance(build_model(default_args(pretrain_choice="scratch:ViT-Micro", img_size=(64, 32)), 3), IRRA)
    with pytest.raises(ValueError, match="issue #17"):
        default_args(loss_names="tal+id")
    with pytest.raises(ValueError, match="valid names"):
        default_args(loss_names="tal+xyz")
    assert default_args(loss_names="TRL+sr0.3_tau0.015_margin0.1_n0.5").loss_names == "trl"


def test_resnet_backbone_backprops():
    args = default_args(loss_names="trl", pretrain_choice="scratch:RN-Tiny", img_size=(64, 64), tse_embed_dim=16,
                        select_ratio=0.5)
    m = build_model(args, 3).train()
    b = {"images": torch.randn(4, 3, 64, 64), "caption_ids": torch.tensor([[49406, 5, 6, 49407] + [0] * 73] * 4),
         "pids": torch.tensor([0, 0, 1, 2]), "label_hat": torch.ones(4)}
    ret = m(b)
    (ret["bge_loss"] + ret["tse_loss"] + 1).backward()
    assert m.visul_emb_layer.fc.in_features == 128
    assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith("visul_emb_layer.fc"))


def _rde_format_checkpoint(model):
    """A checkpoint in RDE's released layout: {"model": state dict with base_model.* / visul_emb_layer.* /
    texual_emb_layer.*} (as its Checkpointer saves)."""
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}}


def test_checkpoint_methods(model):
    """Each method recognises its own format; the most specific wins (a backbone-only state dict is IRRA's and
    clip_itc's alike)."""
    sd = model.state_dict()
    assert checkpoint_methods(sd) == ["rde"]
    assert checkpoint_methods({"module." + k: v for k, v in sd.items()}) == ["rde"]
    assert checkpoint_methods({k: v for k, v in sd.items() if not k.startswith("visul_emb_layer.")}) == ["rde"]
    assert checkpoint_methods({k: v for k, v in sd.items() if k.startswith("base_model.")}) == ["irra", "clip_itc"]
    with pytest.raises(ValueError, match="unrecognised"):
        checkpoint_methods({k[len("base_model."):]: v for k, v in sd.items() if k.startswith("base_model.")})
    with pytest.raises(ValueError, match="unrecognised"):
        checkpoint_methods({"foo": torch.zeros(1)})


def test_rde_checkpoint_rebuild_and_finetune(model, golden, clip_file, batch, tmp_path):
    trained = copy.deepcopy(model)
    with torch.no_grad():
        trained.visul_emb_layer.fc.weight.add_(0.01)
    path = tmp_path / "rde_best.pth"
    torch.save(_rde_format_checkpoint(trained), path)
    args = rde_args(golden, clip_file)
    weights = torch.load(path, weights_only=True)["model"]
    rebuilt = build_model_from_checkpoint(args, weights, source=str(path), device="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image_tse(batch["images"]),
                                   trained.eval().encode_image_tse(batch["images"]))
    with pytest.raises(ValueError, match="checkpoint of --method rde"):
        build_model_from_checkpoint(rde_args(golden, clip_file, loss_names="sdm+id"), weights, source=str(path))
    # --pretrain_choice: fine-tune from the RDE checkpoint (backbone and TSE layers loaded)
    ft = build_model(rde_args(golden, clip_file, pretrain_choice=str(path)), 5)
    torch.testing.assert_close(ft.visul_emb_layer.fc.weight, trained.visul_emb_layer.fc.weight)
    torch.testing.assert_close(ft.base_model.token_embedding.weight, trained.base_model.token_embedding.weight)


def test_tse_lr_group(golden, clip_file, model):
    args = rde_args(golden, clip_file, tse_lr=2e-3)
    groups = build_param_groups(args, model)
    names = [n for n, p in model.named_parameters()]
    lr = {n: g["lr"] for n, g in zip(names, groups)}
    assert lr["visul_emb_layer.fc.weight"] == 2e-3 and lr["texual_emb_layer.mlp.layers.0.bias"] == 2e-3
    assert lr["base_model.token_embedding.weight"] == args.lr


def test_joint_features():
    a, b = torch.randn(5, 3), torch.randn(5, 7)
    j = joint_features(a, b)
    torch.testing.assert_close(j.norm(dim=-1), torch.ones(5))


def test_retriever_ranks_by_both_branches(tmp_path):
    """The Retriever (and so visualize.py) scores an RDE model's pairs by (S_bge + S_tse) / 2."""
    from PIL import Image

    from datasets.build import build_transforms
    from search.retrieval import QueryTokenizer, Retriever
    from utils.simple_tokenizer import get_tokenizer
    torch.manual_seed(0)
    m = build_model(default_args(loss_names="tal", pretrain_choice="scratch:ViT-Micro", img_size=(64, 32),
                                 tse_embed_dim=16), 3).eval()
    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 64), colour).save(p)
        paths.append(str(p))
    tf = build_transforms(img_size=(64, 32), is_train=False)
    r = Retriever(m, tf, QueryTokenizer(get_tokenizer(), 77), torch.device("cpu"), method=get_method("rde"))
    q = r.encode_texts(["a man in a red coat"])
    g = r.encode_images(paths, progress=False)
    ids = QueryTokenizer(get_tokenizer(), 77)("a man in a red coat").ids[None]
    imgs = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        cos = lambda a, b: torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).t()
        want = (cos(m.encode_text(ids), m.encode_image(imgs)) + cos(m.encode_text_tse(ids), m.encode_image_tse(imgs))) / 2
    torch.testing.assert_close(q @ g.embeddings.t(), want, atol=1e-5, rtol=1e-5)


# The RDE options' range checks are in tests/test_option_checks.py's REFUSED, with every other option's.


def test_irra_defaults_untouched_by_rde_options():
    a = default_args()
    assert a.loss_names == "sdm+id+mlm" and a.noisy_rate == 0.0 and not a.txt_aug and not a.rde_train_eval_mode
