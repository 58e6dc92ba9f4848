"""TBPS-CLIP through the method interface: its option defaults (config.yaml, --simplified), AdamW parameter groups,
the per-iteration cosine schedule and alpha ramp of its training hook, a fine-tuning run from a TBPS checkpoint
(train.py, then test.py on the run), and back-translation refused without captions_bt."""
import os

import pytest
import torch

import train
from datasets.build import build_caption_aug, build_dataset
from methods.base import TrainState
from methods.registry import get_method
from methods.tbps.checkpoint import is_tbps_state_dict, read_tbps_checkpoint
from methods.tbps.functions import cosine_scheduler
from methods.tbps.method import TBPSHook, loss_config, tbps_param_groups
from model.build import build_model
from tests.conftest import test_script
from utils.options import default_args

CKPT = os.path.join(os.path.dirname(__file__), "fixtures", "tbps", "tbps_checkpoint.pth")
TINY = dict(method="tbps", pretrain_choice="scratch:ViT-Micro", img_size=(64, 32), simclr_mlp=(64, 16, 64),
            device="cpu")


def test_defaults_are_tbps_config_yaml():
    a = default_args(method="tbps")
    assert a.loss_names == "nitc+mvs+ss+citc+ritc" and a.img_size == (224, 224) and a.batch_size == 80
    assert (a.lr, a.num_epoch, a.warmup_epochs, a.target_lr) == (1e-4, 5, 1, 5e-6)
    assert a.lr * a.warmup_factor == pytest.approx(1e-6, rel=1e-12)  # lr_start
    assert (a.optimizer, a.alpha, a.beta, a.adamw_eps, a.weight_decay, a.lr_factor) == ("AdamW", 0.9, 0.98, 1e-8,
                                                                                       0.02, 5.0)
    assert (a.txt_aug_word_drop_rate, a.txt_aug_backtrans_prob, a.img_aug_pool, a.img_aug_pool_ops) == (0.05, 0.1,
                                                                                                       True, 2)
    c = loss_config(a)
    assert (c.mvs_image, c.ss, c.citc, c.ritc, c.id) == (True, True, True, True, False)
    assert (c.ss_ratio, c.simclr_temperature, c.citc_lambda1, c.citc_lambda2, c.citc_ratio, c.ritc_eps) == (
        0.4, 0.1, 0.25, 0.25, 0.1, 1e-2)
    assert (a.softlabel_ratio, a.tbps_dropout, tuple(a.simclr_mlp)) == (0.5, 0.05, (512, 128, 512))


def test_simplified_is_nitc_and_ritc():
    c = loss_config(default_args(method="tbps", simplified=True))
    assert (c.mvs_image, c.ss, c.citc, c.ritc, c.id) == (False, False, False, True, False)
    with pytest.raises(ValueError, match="--simplified"):
        default_args(method="tbps", simplified=True, loss_names="nitc+ss")
    with pytest.raises(ValueError, match="nitc"):
        default_args(method="tbps", loss_names="ritc")
    with pytest.raises(ValueError, match="MLM"):
        default_args(method="tbps", MLM=True)


def test_param_groups_follow_tbps_build_optimizer():
    args = default_args(**TINY, loss_names="nitc+ss+id")
    model = build_model(args, 5)
    groups = {n: g for (n, p), g in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                                        tbps_param_groups(args, model))}
    assert "visual.conv1.weight" not in groups  # frozen
    assert groups["visual.proj"]["weight_decay"] == 0.02 and groups["visual.proj"]["lr"] == 1e-4
    for name in ("logit_scale", "visual.class_embedding", "visual.ln_pre.weight", "simclr_mlp.0.bias",
                 "encode_text.transformer.resblocks.0.attn.in_proj_bias"):
        assert groups[name]["weight_decay"] == 0.0, name
    assert groups["classifier.weight"]["lr"] == pytest.approx(5e-4) and groups["classifier.weight"]["weight_decay"]
    assert groups["classifier.bias"]["lr"] == pytest.approx(5e-4) and groups["classifier.bias"]["weight_decay"] == 0
    assert groups["simclr_mlp.0.weight"]["lr"] == 1e-4


def test_hook_sets_tbps_schedule_and_alpha():
    args = default_args(**TINY, num_epoch=3)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr": args.lr},
                             {"params": [model.bias], "lr": args.lr * 5}])
    state = TrainState(args, model, opt, None, None, "", iters_per_epoch=7)
    hook = TBPSHook()
    hook.before_train(state)
    want = cosine_scheduler(1e-4, 5e-6, 3, 7, 1, 1e-6)
    for epoch in (1, 2, 3):
        state.epoch = epoch
        hook.before_epoch(state)
        for it in range(7):
            state.iteration = it
            batch = hook.before_step(state, {})
            step = (epoch - 1) * 7 + it
            assert opt.param_groups[0]["lr"] == pytest.approx(want[step], rel=1e-12)
            assert opt.param_groups[1]["lr"] == pytest.approx(5 * want[step], rel=1e-12)
            assert batch["alpha"] == pytest.approx(0.5 * it / 7 if epoch == 1 else 0.5)


def test_backtranslation_is_refused_without_captions_bt(tiny_cuhk_root):
    ds = build_dataset("CUHK-PEDES", root=tiny_cuhk_root, verbose=False)
    with pytest.raises(ValueError, match="captions_bt"):
        build_caption_aug(default_args(**TINY), ds)  # TBPS's default backtrans_p 0.1
    aug, _ = build_caption_aug(default_args(**TINY, txt_aug_backtrans_prob=0.0), ds)
    assert aug.word_drop_rate == 0.05 and aug.backtrans_prob == 0.0


def test_finetune_from_a_tbps_checkpoint_then_test_py(tiny_cuhk_root, tmp_path):
    """train.py --method tbps --pretrain_choice <TBPS checkpoint>: its weights start the run (conv1 stays frozen),
    its checkpoints are TBPS's format, test.py evaluates the run."""
    argv = ["--method", "tbps", "--dataset_name", "CUHK-PEDES", "--root_dir", tiny_cuhk_root, "--output_dir",
            str(tmp_path), "--name", "tbps", "--pretrain_choice", CKPT, "--head_width", "32", "--img_size", "64",
            "32", "--batch_size", "8", "--test_batch_size", "16", "--num_workers", "0", "--num_epoch", "2",
            "--device", "cpu", "--log_period", "2", "--txt_aug_backtrans_prob", "0", "--loss_names",
            "nitc+mvs+ss+citc+ritc+id"]
    out = train.main(argv)
    run = out["run_dir"]
    last = torch.load(os.path.join(run, "last.pth"), weights_only=True)["model"]
    start = read_tbps_checkpoint(CKPT)
    assert is_tbps_state_dict(last) and set(last) == set(start)
    assert torch.equal(last["visual.conv1.weight"], start["visual.conv1.weight"])
    assert not torch.equal(last["visual.proj"], start["visual.proj"])
    assert get_method("tbps").checkpoint_match(last) > get_method("irra").checkpoint_match(last)
    metrics = test_script.main(["--config_file", run, "--checkpoint", os.path.join(run, "last.pth")])
    assert 0 <= metrics["R1"] <= 100 and metrics["R10"] >= metrics["R1"]


@pytest.mark.parametrize("name", ["tbps_cuhk_pedes", "tbps_icfg_pedes", "tbps_rstpreid", "tbps_demo"])
def test_recipes_parse(name):
    from utils.options import get_args
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{name}.yaml")
    a = get_args(["--config", path])
    assert a.method == "tbps" and a.loss_names == "nitc+mvs+ss+citc+ritc"
    if name == "tbps_demo":  # a config value equal to the table's default wins over the method's default
        assert a.txt_aug_backtrans_prob == 0.0 and a.img_size == (128, 64)
    if name != "tbps_demo":  # the paper recipe is TBPS's config.yaml: the method's defaults, but amp and val on test
        d = default_args(method="tbps", dataset_name=a.dataset_name)
        differ = {k for k, v in vars(a).items() if vars(d)[k] != v}
        assert differ <= {"precision", "test_batch_size", "name", "num_workers", "config"}, differ
