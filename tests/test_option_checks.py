"""Every range check of the options (utils.options.finalize_args, check_run_name and each method's check_options)
refuses a bad value with a message naming the option; values that run but look wrong are warned about."""
import inspect
import re

import pytest

from utils import options as options_module
from utils.options import default_args


# ------------------------------------------------------------------------------------------- §6 / §10 option checks
# Every range check of utils.options.finalize_args and check_run_name, with a value it must refuse.
REFUSED = [
    ("temperature", dict(temperature=0.0)), ("temperature", dict(temperature=float("nan"))),
    ("text_length", dict(text_length=2)), ("stride_size", dict(stride_size=0)), ("img_size", dict(img_size=(0, 128))),
    ("cmt_depth", dict(cmt_depth=0)), ("batch_size", dict(batch_size=0)), ("test_batch_size", dict(test_batch_size=0)),
    ("num_epoch", dict(num_epoch=0)), ("log_period", dict(log_period=0)), ("stop_epoch", dict(stop_epoch=0)),
    ("warmup_epochs", dict(warmup_epochs=-1)), ("num_instance", dict(num_instance=0)),
    ("num_workers", dict(num_workers=-1)), ("eval_period", dict(eval_period=0)), ("lr", dict(lr=0.0)),
    ("lr", dict(lr=float("inf"))), ("lr", dict(lr=float("nan"))), ("lr", dict(lr=-1e-3)),
    ("weight_decay", dict(weight_decay=-4e-5)), ("weight_decay", dict(weight_decay=float("nan"))),
    ("weight_decay_bias", dict(weight_decay_bias=-1.0)), ("weight_decay_bias", dict(weight_decay_bias=float("inf"))),
    ("batch_size", dict(batch_size=1)), ("batch_size", dict(batch_size=1, loss_names="itc")),
    ("batch_size", dict(batch_size=1, loss_names="cmpm+id")),
    ("txt_aug_word_drop_rate", dict(txt_aug_word_drop_rate=1.5)),
    ("txt_aug_word_drop_apply_prob", dict(txt_aug_word_drop_rate=0.1, txt_aug_word_drop_apply_prob=-0.1)),
    ("txt_aug_backtrans_prob", dict(txt_aug_backtrans_prob=2.0)),
    ("txt_aug_word_drop_apply_prob", dict(txt_aug_word_drop_apply_prob=0.5)),
    ("txt_aug_word_drop_rate", dict(txt_aug_word_drop_rate=0.1, txt_aug_word_drop_apply_prob=0.0)),
    ("img_aug_pool_ops", dict(img_aug_pool=True, img_aug_pool_ops=0)),
    ("img_aug_pool_ops", dict(img_aug_pool=True, img_aug_pool_ops=7)),
    ("img_aug_pool_ops", dict(img_aug_pool_ops=3)),
    ("optimizer", dict(optimizer="adam")), ("lrscheduler", dict(lrscheduler="Cosine")),
    ("warmup_method", dict(warmup_method="exp")), ("sampler", dict(sampler="ids")),
    ("dataset_name", dict(dataset_name="CUHK")), ("val_dataset", dict(val_dataset="train")),
    ("precision", dict(precision="bf16")), ("name", dict(name="a/b")),
    # RDE (issue 15)
    ("noisy_rate", dict(loss_names="tal", noisy_rate=1.5)), ("select_ratio", dict(loss_names="tal", select_ratio=0.0)),
    ("tau", dict(loss_names="tal", tau=0.0)), ("margin", dict(loss_names="tal", margin=-0.1)),
    ("tse_embed_dim", dict(loss_names="tal", tse_embed_dim=1)), ("tse_lr", dict(loss_names="tal", tse_lr=0.0)),
    ("gmm_setting", dict(loss_names="tal", gmm_setting="slow")),
    ("ccd_batch_size", dict(loss_names="tal", ccd_batch_size=1)), ("batch_size", dict(loss_names="tal", batch_size=1)),
    ("loss_names", dict(loss_names="tal+id")), ("loss_names", dict(loss_names="tal", MLM=True)),
    # methods as plug-ins (issue 22)
    ("loss_names", dict(method="clip_itc", loss_names="sdm")), ("MLM", dict(method="clip_itc", MLM=True)),
    ("method", dict(method="tbps_nope")), ("metrics", dict(metrics=("R1",))),
    # TBPS-CLIP (issue 23)
    ("loss_names", dict(method="tbps", loss_names="ritc")), ("simplified", dict(method="tbps", simplified=True,
                                                                               loss_names="nitc+ss")),
    ("MLM", dict(method="tbps", MLM=True)), ("softlabel_ratio", dict(method="tbps", softlabel_ratio=1.5)),
    ("simclr_temperature", dict(method="tbps", simclr_temperature=0.0)), ("ritc_eps", dict(method="tbps", ritc_eps=0.0)),
    ("tbps_dropout", dict(method="tbps", tbps_dropout=1.0)), ("head_width", dict(method="tbps", head_width=0)),
    ("simclr_mlp", dict(method="tbps", simclr_mlp=(32, 16))), ("simclr_mlp", dict(method="tbps", simclr_mlp=(32, 0, 32))),
]


@pytest.mark.parametrize("option,overrides", REFUSED, ids=[f"{o}-{i}" for i, (o, _) in enumerate(REFUSED)])
def test_every_checked_option_refuses_a_bad_value(option, overrides):
    with pytest.raises(ValueError, match=rf"^--{option} "):
        default_args(**overrides)


def test_every_range_check_has_a_negative_test():
    """The option names checked in finalize_args (its checks list and choices) all appear in REFUSED: a new check
    without a negative test fails here."""
    from methods.registry import METHODS, method_options

    src = inspect.getsource(options_module.finalize_args) + "".join(
        inspect.getsource(method_options(m).check_options) for m in METHODS)
    checked = set(re.findall(r'\(\s*"(\w+)",', src)) | {"name", "method"}
    assert checked - {o for o, _ in REFUSED} == set()


def test_batch_size_one_is_fine_without_a_contrastive_loss():
    assert default_args(batch_size=1, loss_names="id").batch_size == 1


@pytest.mark.parametrize("overrides,option", [(dict(warmup_epochs=5, num_epoch=5), "--warmup_epochs 5 >= --num_epoch 5"),
                                              (dict(img_size=(100, 64)), "--img_size 100 64 is not divisible by "
                                                                         "--stride_size 16")])
def test_values_that_run_but_look_wrong_are_warned_about(caplog, overrides, option):
    with caplog.at_level("WARNING", logger="IRRA.options"):
        default_args(**overrides)
    assert any(option in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="IRRA.options"):
        default_args(warmup_epochs=1, num_epoch=5)
    assert not caplog.records
