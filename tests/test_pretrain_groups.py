"""Person-pretrained starts: --pretrain_choice takes MLLM4Text-ReID's released layout (an IRRA state dict under
"model", keys prefixed "module.", loaded non-strict by its finetune.py), with and without the prefix; the load report
by group (backbone / cross-modal / classifier / method layers) for IRRA, RDE and TBPS models (TBPS's backbone under its
own key names, through its CLIP-key mapping); a checkpoint whose backbone does not match is refused, naming the first
mismatched key. Generated tiny checkpoints."""
import logging
import os

import pytest
import torch
import yaml

import train
from methods.tbps.checkpoint import tbps_backbone_name
from methods.tbps.functions import interpolate_text, resize_pos_embed
from model.build import build_model
from model.pretrain_report import format_group_report, group_report, irra_backbone_name, param_group
from tests.conftest import tiny_train_argv
from tests.test_pretrain_irra import tiny_args  # the same tiny IRRA options

CKPT_CLASSES = 11  # the pretraining's identities (the fine-tuning set has others)
TBPS = dict(loss_names="nitc+mvs+ss+citc+ritc", simclr_mlp=(64, 16, 64))  # TBPS's default losses
BACKBONE_NAME = {"irra": irra_backbone_name, "rde": irra_backbone_name, "clip_itc": irra_backbone_name,
                 "tbps": tbps_backbone_name}  # a model key -> the CLIP key of its backbone tensor (None: not backbone)


@pytest.fixture(scope="module")
def person_sd():
    """A tiny IRRA's state dict (sdm+mlm+id, 11 identities), weights perturbed so that they differ from any init."""
    torch.manual_seed(0)
    model = build_model(tiny_args(), CKPT_CLASSES)
    gen = torch.Generator().manual_seed(99)
    return {k: v + torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


def save_mllm4text(sd, path, prefix="module."):
    """MLLM4Text-ReID's layout: {"model": {prefix + key: tensor}} (its DataParallel / DDP training adds module.)."""
    torch.save({"model": {prefix + k: v for k, v in sd.items()}}, path)
    return str(path)


def groups_logged(caplog):
    return [r.getMessage().strip() for r in caplog.records if r.getMessage().startswith("  ")]


@pytest.mark.parametrize("prefix", ["module.", ""], ids=["module", "bare"])
def test_irra_from_mllm4text_layout(person_sd, tmp_path, caplog, prefix):
    path = save_mllm4text(person_sd, tmp_path / "mllm4text.pth", prefix)
    torch.manual_seed(4)
    plain = build_model(tiny_args(), 6).state_dict()
    torch.manual_seed(4)
    with caplog.at_level(logging.INFO, logger="IRRA"):
        got = build_model(tiny_args(pretrain_choice=path), 6).state_dict()
    for k, v in got.items():
        expected = plain[k] if k.startswith("classifier.") else person_sd[k]  # 11 ids vs 6: classifier fresh
        assert torch.equal(v, expected), k
    n_backbone = sum(param_group(k) == "backbone" for k in got)
    n_cross = sum(param_group(k) == "cross-modal" for k in got)
    assert groups_logged(caplog) == [
        f"backbone: {n_backbone} loaded",
        f"cross-modal: {n_cross} loaded",
        "classifier: 2 skipped (other shape) (classifier.weight: another number of identities, checkpoint (11, 64) "
        "vs model (6, 64), classifier.bias: another number of identities, checkpoint (11,) vs model (6,))"]


def test_prefix_on_some_keys_only_is_stripped_per_key(person_sd, tmp_path):
    """MLLM4Text-ReID's finetune.py replaces 'module.' in every key: a file where only some keys have it loads."""
    sd = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(person_sd.items())}
    path = str(tmp_path / "mixed.pth")
    torch.save({"model": sd}, path)
    got = build_model(tiny_args(pretrain_choice=path), CKPT_CLASSES).state_dict()
    for k, v in got.items():
        assert torch.equal(v, person_sd[k]), k


def test_non_strict_missing_cross_modal_at_168_tokens(person_sd, tmp_path, caplog):
    """A backbone-only checkpoint into sdm+mlm+id at text length 168: the backbone loads (text positions resized),
    the cross-modal modules and classifier keep their initialisation and are reported missing by group."""
    path = save_mllm4text({k: v for k, v in person_sd.items() if k.startswith("base_model.")}, tmp_path / "bb.pth")
    with caplog.at_level(logging.INFO, logger="IRRA"):
        model = build_model(tiny_args(pretrain_choice=path, text_length=168), 6)
    lines = groups_logged(caplog)
    n_backbone = sum(k.startswith("base_model.") for k in person_sd)
    assert lines[0] == (f"backbone: {n_backbone - 1} loaded; 1 resized (base_model.positional_embedding (77, 64) -> "
                        f"(168, 64))")
    n_cross = sum(param_group(k) == "cross-modal" for k in model.state_dict())
    assert lines[1].startswith(f"cross-modal: {n_cross} not in the checkpoint (")
    assert lines[2] == "classifier: 2 not in the checkpoint (classifier.weight, classifier.bias)"
    assert model.base_model.positional_embedding.shape == (168, 64)


def test_rde_model_from_an_irra_checkpoint(person_sd, tmp_path, caplog):
    """An RDE model (its TSE heads are method layers) starts from the same person-pretrained IRRA checkpoint."""
    path = save_mllm4text(person_sd, tmp_path / "mllm4text.pth")
    with caplog.at_level(logging.INFO, logger="IRRA"):
        model = build_model(tiny_args(pretrain_choice=path, loss_names="tal", tse_embed_dim=32), 6)
    sd = model.state_dict()
    for k in sd:
        if k.startswith("base_model."):
            assert torch.equal(sd[k], person_sd[k]), k
    n_backbone = sum(k.startswith("base_model.") for k in sd)
    n_method = sum(param_group(k) == "method layers" for k in sd)
    n_cross_ckpt = sum(param_group(k) == "cross-modal" for k in person_sd)
    lines = groups_logged(caplog)
    assert n_method > 0 and lines[0] == f"backbone: {n_backbone} loaded"
    assert lines[1].startswith(f"cross-modal: {n_cross_ckpt} not in the model (")
    assert lines[2] == "classifier: 2 not in the model (classifier.weight, classifier.bias)"
    assert lines[3].startswith(f"method layers: {n_method} not in the checkpoint (")


@pytest.mark.parametrize("prefix", ["module.", ""], ids=["module", "bare"])
def test_tbps_from_mllm4text_layout(person_sd, tmp_path, caplog, prefix):
    """TBPS from an IRRA-layout checkpoint: its backbone under TBPS's names (encode_text.*), IRRA's cross-modal
    modules and classifier not in the model, TBPS's SS head and learned temperature not in the checkpoint (kept at
    their initialisation, the same as a start from scratch)."""
    path = save_mllm4text(person_sd, tmp_path / "mllm4text.pth", prefix)
    torch.manual_seed(4)
    plain = build_model(tiny_args(method="tbps", **TBPS), 6).state_dict()
    torch.manual_seed(4)
    with caplog.at_level(logging.INFO, logger="IRRA"):
        got = build_model(tiny_args(pretrain_choice=path, method="tbps", **TBPS), 6).state_dict()
    for k, v in got.items():
        clip_key = tbps_backbone_name(k)
        assert torch.equal(v, plain[k] if clip_key is None else person_sd["base_model." + clip_key]), k
    assert got["encode_text.ln_final.weight"].shape == (64,) and "ln_final.weight" not in got
    n_backbone = sum(k.startswith("base_model.") for k in person_sd)
    n_cross = sum(param_group(k) == "cross-modal" for k in person_sd)
    n_heads = sum(tbps_backbone_name(k) is None for k in got)
    lines = groups_logged(caplog)
    assert lines[:3] == [f"backbone: {n_backbone} loaded",
                         f"cross-modal: {n_cross} not in the model (cross_attn.in_proj_weight, cross_attn.in_proj_bias, "
                         f"cross_attn.out_proj.weight, +{n_cross - 3} more)",
                         "classifier: 2 not in the model (classifier.weight, classifier.bias)"]
    assert n_heads == 5 and lines[3] == (f"method layers: {n_heads} not in the checkpoint (logit_scale, "
                                         f"simclr_mlp.0.weight, simclr_mlp.0.bias, +2 more)")
    assert len(lines) == 4


def test_tbps_backbone_resized_as_from_a_clip_file(person_sd, tmp_path, caplog):
    """At another image size and 168 tokens TBPS's backbone from the IRRA checkpoint is the one a CLIP file of the
    same weights gives (text positions by TBPS's interpolate_text, image positions resized from the 4x2 grid); an
    id head for as many identities as the checkpoint's loads its classifier (name and shape match)."""
    clip_file = str(tmp_path / "clip.pth")
    clip_sd = {k[len("base_model."):]: v for k, v in person_sd.items() if k.startswith("base_model.")}
    torch.save({**clip_sd, "logit_scale": torch.tensor(4.6052)}, clip_file)  # an OpenAI file has its temperature
    path = save_mllm4text(person_sd, tmp_path / "mllm4text.pth")
    kw = dict(method="tbps", text_length=168, img_size=(96, 48), loss_names="nitc+ritc+id")
    with caplog.at_level(logging.INFO, logger="IRRA"):
        got = build_model(tiny_args(pretrain_choice=path, **kw), CKPT_CLASSES).state_dict()
    lines = groups_logged(caplog)
    ref = build_model(tiny_args(pretrain_choice=clip_file, **kw), CKPT_CLASSES).state_dict()
    for k, v in got.items():
        if tbps_backbone_name(k) is not None:
            assert torch.equal(v, ref[k]), k
    assert torch.equal(got["encode_text.positional_embedding"],
                       interpolate_text(person_sd["base_model.positional_embedding"], 168))
    assert got["visual.positional_embedding"].shape == (1 + 6 * 3, 64)
    assert torch.equal(got["classifier.weight"], person_sd["classifier.weight"])
    n_backbone = sum(k.startswith("base_model.") for k in person_sd)
    assert lines[0] == (f"backbone: {n_backbone - 2} loaded; 2 resized (base_model.positional_embedding (77, 64) -> "
                        f"(168, 64), base_model.visual.positional_embedding (9, 64) -> (19, 64))")
    assert lines[2:] == ["classifier: 2 loaded", "method layers: 1 not in the checkpoint (logit_scale)"]


def test_tbps_image_grid_from_the_configs_yaml_next_to_it(person_sd, tmp_path):
    """8 image positions into a 4x4 grid: 2x4 or 4x2, no guess; the configs.yaml of the run that wrote the checkpoint
    (64x32, stride 16) says 4x2."""
    path = save_mllm4text(person_sd, tmp_path / "mllm4text.pth")
    args = tiny_args(pretrain_choice=path, method="tbps", img_size=(64, 64), **TBPS)
    with pytest.raises(ValueError, match="cannot tell the image grid"):
        build_model(args, 6)
    with open(tmp_path / "configs.yaml", "w") as f:
        yaml.safe_dump({"img_size": [64, 32], "stride_size": 16}, f)
    got = build_model(args, 6).state_dict()["visual.positional_embedding"]
    src = person_sd["base_model.visual.positional_embedding"]
    torch.testing.assert_close(got, resize_pos_embed(src, None, 4, 4, old_grid=(4, 2)))
    assert not torch.allclose(got, resize_pos_embed(src, None, 4, 4, old_grid=(2, 4)))


@pytest.mark.parametrize("method", ["irra", "tbps"])
@pytest.mark.parametrize("change,key", [
    ("extra", "base_model.visual.prompt_tokens"),
    ("shape", "base_model.transformer.resblocks.0.mlp.c_fc.bias"),
    ("missing", "base_model.transformer.resblocks.0.ln_1.weight"),
])
def test_mismatched_backbone_is_refused(person_sd, tmp_path, change, key, method):
    sd = dict(person_sd)
    if change == "extra":
        sd[key] = torch.zeros(3, 64)
    elif change == "shape":
        sd[key] = sd[key][:-1]
    else:
        del sd[key]
    path = save_mllm4text(sd, tmp_path / f"{change}.pth")
    with pytest.raises(ValueError, match="backbone does not match") as err:
        build_model(tiny_args(pretrain_choice=path, method=method, **(TBPS if method == "tbps" else {})), 6)
    message = str(err.value)
    assert path in message and key.split("base_model.", 1)[1] in message
    if method == "tbps":  # checked before the backbone is loaded: named as in the checkpoint
        assert f"first mismatched key {key!r}" in message


def test_group_report_functions():
    names = ["base_model.visual.conv1.weight", "cross_attn.in_proj_weight", "mlm_head.fc.bias", "classifier.weight",
             "visul_emb_layer.fc.weight"]
    assert [param_group(n) for n in names] == ["backbone", "cross-modal", "cross-modal", "classifier", "method layers"]
    rep = group_report(names[:2], ["base_model.positional_embedding (77, 8) -> (168, 8)"],
                       ["classifier.weight: other"], ["visul_emb_layer.fc.weight"], ["mlm_head.fc.bias"])
    assert format_group_report(rep) == [
        "backbone: 1 loaded; 1 resized (base_model.positional_embedding (77, 8) -> (168, 8))",
        "cross-modal: 1 loaded; 1 not in the model (mlm_head.fc.bias)",
        "classifier: 1 skipped (other shape) (classifier.weight: other)",
        "method layers: 1 not in the checkpoint (visul_emb_layer.fc.weight)"]


def test_training_starts_from_the_checkpoint(person_sd, tiny_cuhk_root, tmp_path):
    """train.py --pretrain_choice <MLLM4Text-ReID layout>: the run's first weights are the checkpoint's (backbone,
    cross-modal); it trains an epoch on the 8-identity set."""
    path = save_mllm4text(person_sd, tmp_path / "mllm4text.pth")
    out = train.main(tiny_train_argv(tiny_cuhk_root, str(tmp_path / "logs"), "--num_epoch", "1", "--pretrain_choice",
                                     path, "--lr", "1e-9"))
    with open(os.path.join(out["run_dir"], "train_log.txt"), encoding="utf-8") as f:
        log = f.read()
    assert "fine-tuning from the IRRA checkpoint" in log and "classifier: 2 skipped (other shape)" in log
    sd = torch.load(os.path.join(out["run_dir"], "last.pth"), weights_only=True)["model"]
    torch.testing.assert_close(sd["base_model.ln_final.weight"], person_sd["base_model.ln_final.weight"], atol=1e-4,
                               rtol=0)


def test_tbps_training_starts_from_the_checkpoint(person_sd, tiny_cuhk_root, tmp_path):
    """train.py --method tbps --pretrain_choice <MLLM4Text-ReID layout>: the report is in the run's log, the backbone
    starts from the checkpoint's, the run writes TBPS's checkpoint format."""
    path = save_mllm4text(person_sd, tmp_path / "mllm4text.pth")
    argv = tiny_train_argv(tiny_cuhk_root, str(tmp_path / "logs"), "--num_epoch", "1", "--pretrain_choice", path,
                           "--lr", "1e-9", "--method", "tbps", "--simclr_mlp", "64", "16", "64",
                           "--txt_aug_backtrans_prob", "0")
    drop = argv.index("--MLM")
    argv = argv[:drop] + argv[drop + 1:]
    argv[argv.index("--loss_names") + 1] = TBPS["loss_names"]
    out = train.main(argv)
    with open(os.path.join(out["run_dir"], "train_log.txt"), encoding="utf-8") as f:
        log = f.read()
    n_backbone = sum(k.startswith("base_model.") for k in person_sd)
    assert "fine-tuning from the IRRA checkpoint" in log and f"backbone: {n_backbone} loaded" in log
    sd = torch.load(os.path.join(out["run_dir"], "last.pth"), weights_only=True)["model"]
    assert "encode_text.text_projection" in sd and not any(k.startswith("base_model.") for k in sd)
    torch.testing.assert_close(sd["encode_text.ln_final.weight"], person_sd["base_model.ln_final.weight"], atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("dataset", ["cuhk_pedes", "icfg_pedes", "rstpreid", "ufine6926"])
def test_pretrained_recipes(dataset):
    """configs/irra_<dataset>_pretrained.yaml: MLLM4Text-ReID's fine-tuning settings, the from-CLIP recipe's
    dataset options (the same text length)."""
    from utils.options import get_args
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pre = get_args(["--config", os.path.join(repo, "configs", f"irra_{dataset}_pretrained.yaml")])
    clip = get_args(["--config", os.path.join(repo, "configs", f"{dataset}.yaml")])
    assert (pre.lr, pre.batch_size, pre.loss_names, pre.num_epoch, pre.img_aug) == (1e-5, 64, "sdm+mlm+id", 60, True)
    assert pre.pretrain_choice.endswith(".pth") and clip.pretrain_choice == "ViT-B/16"
    assert (pre.dataset_name, pre.text_length) == (clip.dataset_name, clip.text_length)
    assert clip.text_length == (168 if dataset == "ufine6926" else 77)


def test_every_method_starts_from_an_irra_checkpoint(person_sd, tmp_path, caplog):
    """The same module.-prefixed IRRA checkpoint starts each registered method: its backbone always loads; what
    the method lacks (cross-modal, classifier) is reported as not in the model, what it adds as not in the
    checkpoint."""
    from methods.registry import METHODS

    path = save_mllm4text(person_sd, tmp_path / "mllm4text.pth")
    overrides = {"irra": {}, "rde": dict(loss_names="tal", tse_embed_dim=32), "clip_itc": dict(loss_names="itc"),
                 "tbps": TBPS}
    assert set(overrides) == set(METHODS), "add the new method's options here"
    for name, kw in overrides.items():
        caplog.clear()
        args = tiny_args(pretrain_choice=path, method=name, **{"loss_names": "sdm+mlm+id", "cmt_depth": 1, **kw})
        if name == "clip_itc":
            args = args.replace(MLM=False)
        with caplog.at_level(logging.INFO, logger="IRRA"):
            sd = build_model(args, CKPT_CLASSES).state_dict()
        backbone = {k: BACKBONE_NAME[name](k) for k in sd if BACKBONE_NAME[name](k) is not None}
        assert len(backbone) == sum(k.startswith("base_model.") for k in person_sd), name
        assert groups_logged(caplog)[0] == f"backbone: {len(backbone)} loaded", name
        for k, clip_key in backbone.items():
            assert torch.equal(sd[k], person_sd["base_model." + clip_key]), (name, k)
