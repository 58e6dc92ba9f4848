"""Command-line options.

Every option of the original IRRA ``utils/options.py`` keeps its name and default, but is typed so that it can
actually be set from the command line (``--img_size 384 128`` parses to two ints; periods are ints). New options
(``build_parser`` lists them all) include ``--config`` (a YAML file whose values become defaults that the command
line overrides), ``--device``, ``--precision``, ``--seed``, ``--mlm_mask_caption``, ``--mlm_probability``, the
successors' augmentations (``--txt_aug_*``, ``--img_aug_pool*``, off by default), the scale options
(``--local_negatives``, ``--grad_checkpointing``) and the original's hard-coded constants made options
(``--adam_eps``, ...) with the original's values as defaults.

This module is the one place where options are filled and checked: ``get_args`` (the command line + ``--config``)
and ``load_config_args`` (a saved run's ``configs.yaml``) both return a Namespace holding every option, typed and
validated, so library code reads ``args.x`` directly. Values read from YAML are checked against each option's type
(``"false"`` becomes False, ``img_size: 384`` is an error naming ``img_size``).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple


from methods.registry import DEFAULT_METHOD, METHODS, check_method, method_options
from utils.choices import (DATASETS, EXTRA_METRICS, IMG_AUG_POOL, LR_SCHEDULERS, OPTIMIZERS, PRECISIONS, SAMPLERS,
                           VAL_DATASETS, WARMUP_METHODS, check_choice, parse_loss_names)
from utils.iotools import load_train_configs
from utils import run_dir
from utils.run_dir import RUN_STATE_KEYS, FileReadError

logger = logging.getLogger("IRRA.options")
# Defaults of the options of the successors' augmentations that only matter when another option turns them on.
WORD_DROP_APPLY_PROB = 1.0
IMG_AUG_POOL_OPS = 2


def build_parser() -> argparse.ArgumentParser:
    """The parser of every training option (the original's names and defaults, plus ours)."""
    parser = argparse.ArgumentParser(description="IRRA Args", allow_abbrev=False)
    ######################## general settings ########################
    parser.add_argument("--config", default=None, help="YAML file of option values used as defaults (the command line wins)")
    parser.add_argument("--local_rank", default=0, type=int)
    parser.add_argument("--name", default="baseline", help="experiment name to save")
    parser.add_argument("--output_dir", default="logs")
    parser.add_argument("--log_period", type=int, default=100)
    parser.add_argument("--eval_period", type=int, default=1)
    parser.add_argument("--val_dataset", default="test", choices=VAL_DATASETS,
                        help="split evaluated during training")
    parser.add_argument("--resume", default=False, action="store_true")
    parser.add_argument("--resume_ckpt_file", default="", help="resume from ...")
    parser.add_argument("--device", default="auto", help="auto | cpu | an accelerator as torch names it, optionally with :N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: fp16 weights (the original's convert_weights) on an accelerator, fp32 on the CPU")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=tuple(METHODS),
                        help="the method trained / evaluated (methods/registry.py); with the default, a loss name "
                             "that only another method has selects that method")

    ######################## model general settings ########################
    parser.add_argument("--pretrain_choice", default="ViT-B/16",
                        help="OpenAI CLIP name, path to a CLIP file, path to an IRRA checkpoint (best.pth) to "
                             "fine-tune from, or scratch:<arch>")
    parser.add_argument("--clip_download_root", default=None, help="CLIP weights cache (default ~/.cache/clip)")
    parser.add_argument("--temperature", type=float, default=0.02,
                        help="temperature of the similarity logits (logit scale = 1 / temperature), > 0")
    parser.add_argument("--img_aug", default=False, action="store_true")

    ## augmentations of IRRA's successors (datasets/augment.py), off by default
    parser.add_argument("--txt_aug_word_drop_rate", type=float, default=0.0,
                        help="random word deletion: each word of a caption dropped with this probability "
                             "(EDA's random deletion; README: Augmentations); 0 = off")
    parser.add_argument("--txt_aug_word_drop_apply_prob", type=float, default=WORD_DROP_APPLY_PROB,
                        help="probability that word deletion is applied to a caption (1.0: every caption)")
    parser.add_argument("--txt_aug_backtrans_prob", type=float, default=0.0,
                        help="probability that a train caption is replaced by its back-translation (the annotation "
                             "entry's 'captions_bt'); 0 = off")
    parser.add_argument("--txt_aug", default=False, action="store_true",
                        help="token augmentation: each token hit with p 0.2, then masked 60%% / replaced by a random "
                             "token 20%% / deleted 20%% (the noisy-correspondence recipe's; README)")
    parser.add_argument("--img_aug_pool", default=False, action="store_true",
                        help=f"image augmentation pool: --img_aug_pool_ops ops per sample drawn from "
                             f"{list(IMG_AUG_POOL)}; replaces the train pipeline (--img_aug included)")
    parser.add_argument("--img_aug_pool_ops", type=int, default=IMG_AUG_POOL_OPS,
                        help=f"how many distinct ops of the pool each sample gets (1..{len(IMG_AUG_POOL)})")

    ## cross modal transfomer setting
    parser.add_argument("--cmt_depth", type=int, default=4, help="cross modal transformer self attn layers")
    parser.add_argument("--masked_token_rate", type=float, default=0.8, help="masked token rate for mlm task")
    parser.add_argument("--masked_token_unchanged_rate", type=float, default=0.1,
                        help="masked token unchanged rate")
    parser.add_argument("--mlm_probability", type=float, default=0.15, help="probability a token is chosen for MLM")
    parser.add_argument("--mlm_mask_caption", default=False, action="store_true",
                        help="reproduce the original's bug: caption_ids used by SDM/ID are masked too")
    parser.add_argument("--lr_factor", type=float, default=5.0, help="lr factor for random init self implement module")
    parser.add_argument("--MLM", default=False, action="store_true",
                        help="whether to use Mask Language Modeling dataset")

    ######################## loss settings ########################
    parser.add_argument("--loss_names", default="sdm+id+mlm", help="'+'-separated subset of the method's losses (irra: itc, sdm, cmpm, id, mlm; "
                             "methods/<name>/options.py: LOSSES)")
    parser.add_argument("--mlm_loss_weight", type=float, default=1.0, help="mlm loss weight")
    parser.add_argument("--id_loss_weight", type=float, default=1.0, help="id loss weight")

    ######################## noisy correspondences (README "Noisy correspondences") ########################
    parser.add_argument("--noisy_rate", type=float, default=0.0,
                        help="fraction of train pairs whose captions are permuted among themselves (the noisy-"
                             "correspondence benchmark's 0.2; ours 0 = no noise)")
    parser.add_argument("--noisy_file", default="",
                        help="noise index .npy (row i gets the caption of row noisy_index[i]); read if it exists, "
                             "else drawn from --seed and --noisy_rate and written there")

    ######################## vison trainsformer settings ########################
    parser.add_argument("--img_size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    parser.add_argument("--stride_size", type=int, default=16)

    ######################## text transformer settings ########################
    parser.add_argument("--text_length", type=int, default=77)
    parser.add_argument("--vocab_size", type=int, default=49408)

    ######################## solver ########################
    parser.add_argument("--optimizer", type=str, default="Adam", help=f"{list(OPTIMIZERS)}")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--bias_lr_factor", type=float, default=2.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight_decay", type=float, default=4e-5)
    parser.add_argument("--weight_decay_bias", type=float, default=0.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--beta", type=float, default=0.999)
    parser.add_argument("--adam_eps", type=float, default=1e-3, help="Adam epsilon (the original's 1e-3)")
    parser.add_argument("--adamw_eps", type=float, default=1e-8, help="AdamW epsilon")
    parser.add_argument("--fused_optimizer", default=False, action="store_true",
                        help="torch's fused optimizer kernel (faster, same math up to float rounding)")
    parser.add_argument("--merge_param_groups", default=True, action=argparse.BooleanOptionalAction,
                        help="one optimizer param group per (lr, weight decay) (default); --no-merge_param_groups: "
                             "the original's one group per parameter. The same updates either way (tested bitwise); "
                             "merged groups launch far fewer kernels (1.7x the training speed on a GPU, see README). "
                             "A checkpoint resumes only with the layout it was saved with")

    ######################## scheduler ########################
    parser.add_argument("--num_epoch", type=int, default=60)
    parser.add_argument("--stop_epoch", type=int, default=None,
                        help="stop after this epoch (schedule still planned for --num_epoch); continue with --resume")
    parser.add_argument("--milestones", type=int, nargs="+", default=(20, 50))
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--warmup_factor", type=float, default=0.1)
    parser.add_argument("--warmup_epochs", type=int, default=5)
    parser.add_argument("--warmup_method", type=str, default="linear")
    parser.add_argument("--lrscheduler", type=str, default="cosine")
    parser.add_argument("--target_lr", type=float, default=0)
    parser.add_argument("--power", type=float, default=0.9)

    ######################## dataset ########################
    parser.add_argument("--dataset_name", default="CUHK-PEDES", help=f"{list(DATASETS)}")
    parser.add_argument("--sampler", default="random", help=f"choose sampler from {list(SAMPLERS)}")
    parser.add_argument("--num_instance", type=int, default=4)
    parser.add_argument("--root_dir", default="./data")
    parser.add_argument("--anno_file", default="",
                        help="annotation file (a name under the dataset folder, or a path) read instead of the "
                             "dataset's own, e.g. UFine6926_Annotations_1024.json's re-captioned versions; '' = its own")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--test_batch_size", type=int, default=512)
    parser.add_argument("--num_workers", type=int, default=8)
    parser.add_argument("--test", dest="training", default=True, action="store_false")
    parser.add_argument("--i2t_metric", default=False, action="store_true", help="also report image-to-text metrics")
    parser.add_argument("--metrics", nargs="*", default=(), choices=EXTRA_METRICS, metavar="NAME",
                        help=f"metrics reported besides R@k / mAP / mINP, of {list(EXTRA_METRICS)} (mSD: UFineBench's, "
                             f"reported as mSD and mSD_rank_order; always on UFine6926)")
    parser.add_argument("--skip_image_check", default=False, action="store_true",
                        help="do not verify every image of the run's splits before training")

    ######################## scale ########################
    parser.add_argument("--local_negatives", default=False, action="store_true",
                        help="DDP: contrastive losses over each rank's own batch only (the original); by default the "
                             "features of all ranks are gathered, so every loss is over the global --batch_size (a "
                             "method's BatchNorm layers may keep global statistics either way: see its docs)")
    parser.add_argument("--grad_checkpointing", default=False, action="store_true",
                        help="recompute the transformer blocks' activations in backward: less memory, more compute, "
                             "same numbers")
    parser.add_argument("--fused_attention", default=True, action=argparse.BooleanOptionalAction,
                        help="attention by F.scaled_dot_product_attention (fused kernels) in every transformer block "
                             "and the cross attention (default); --no-fused_attention: nn.MultiheadAttention's forward. "
                             "Same parameters; bitwise the same numbers on the CPU, another summation order on a GPU")
    parser.add_argument("--length_bucket", type=int, default=1, metavar="N",
                        help="round the caption cut and the MLM query length up to a multiple of N (at most "
                             "--text_length) and pad the MLM head's masked tokens to a few sizes, so that the step's "
                             "shapes take few values (8 for compiled / captured steps); 1 (default): exact cuts. The "
                             "losses are bitwise the same; LayerNorm gradients differ by float rounding")
    for name in METHODS:  # each method's own group (methods/<name>/options.py)
        method_options(name).add_options(parser)
    return parser


# Keys of a configs.yaml that are no option (the run's state, not something to parse).
NOT_OPTIONS = ("distributed", "environment", "noisy_rate_measured")
_BOOL_WORDS = {"true": True, "false": False}


def _typed_value(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` read from YAML for ``action``'s option, converted to the option's type or a ValueError naming it."""
    name = action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise ValueError(f"{where}: option '{name}' expects true or false, got {value!r}")
        return value
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"{where}: option '{name}' has no value (expected {_expected(action)})")
    if action.nargs in (2, "+", "*"):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: option '{name}' expects a list {_expected(action)}, got {value!r}")
        if action.nargs == 2 and len(value) != 2:
            raise ValueError(f"{where}: option '{name}' expects {_expected(action)}, got {list(value)!r}")
        return tuple(_scalar(action, v, where) for v in value)
    return _scalar(action, value, where)


def _expected(action: argparse.Action) -> str:
    if action.nargs == 2 and action.metavar:
        return "[" + ", ".join(action.metavar) + "]"
    kind = getattr(action.type, "__name__", "str")
    return f"[{kind}, ...]" if action.nargs in ("+", "*") else kind


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    kind = action.type or str
    name = action.dest
    if isinstance(value, (list, tuple, dict)) or isinstance(value, bool):
        raise ValueError(f"{where}: option '{name}' expects {_expected(action)}, got {value!r}")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = int(value) if not isinstance(value, str) else int(value.strip())
        elif kind is float:
            out = float(value)  # YAML reads 1e-5 (no dot) as a string
        else:
            out = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: option '{name}' expects {_expected(action)}, got {value!r}") from None
    if action.choices is not None and out not in action.choices:
        raise ValueError(f"{where}: option '{name}' is {out!r}; valid: {list(action.choices)}")
    return out


def typed_config(parser: argparse.ArgumentParser, cfg: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Check every ``option: value`` of a YAML config against the parser: unknown names and values that do not fit
    the option's type raise a ValueError naming ``where`` and the option; returns the converted values."""
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    unknown = sorted(set(cfg) - set(actions) - set(NOT_OPTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; valid options are {sorted(actions)}")
    return {k: (_typed_value(actions[k], v, where) if k in actions else v) for k, v in cfg.items()}


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Read a YAML config (a hand-written one, or a run's configs.yaml, ours or the original's) as option defaults.

    Every key must be a known option of the right type. From a run's configs.yaml the run-state keys are dropped and
    ``output_dir`` (the run directory there) is turned back into the logs root, so the file starts a new run with
    the same options.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        cfg = vars(load_train_configs(path))
    except FileReadError as e:  # not UTF-8, malformed YAML, nested too deeply: the reader's message names the file
        raise ValueError(f"--config {e}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"--config {path}: expected a mapping of option: value ({e})") from e
    cfg = typed_config(parser, cfg, f"--config {path}")
    for key in RUN_STATE_KEYS:
        cfg.pop(key, None)
    out = os.path.normpath(str(cfg.get("output_dir", "")))
    if cfg.get("dataset_name") and os.path.basename(os.path.dirname(out)) == cfg["dataset_name"]:
        cfg["output_dir"] = os.path.dirname(os.path.dirname(out))  # logs/<dataset>/<run> -> logs
    return cfg


def _warn_odd_values(args: argparse.Namespace) -> None:
    """Warn (naming the option) about values that run but are probably not what was meant."""
    if args.warmup_epochs >= args.num_epoch:
        logger.warning("--warmup_epochs %s >= --num_epoch %s: the whole run is warm-up, the lr never reaches --lr %g",
                       args.warmup_epochs, args.num_epoch, args.lr)
    height, width = args.img_size
    if height % args.stride_size or width % args.stride_size:
        logger.warning("--img_size %d %d is not divisible by --stride_size %d: with a ViT whose patch size is the "
                       "stride, the last %d rows and %d columns of every image are not seen by the model", height,
                       width, args.stride_size, height % args.stride_size, width % args.stride_size)


def check_run_name(name: str) -> None:
    """``--name`` becomes one folder name under ``<output_dir>/<dataset_name>/``: refuse path separators, a leading
    dot (hidden folders, ``.`` and ``..``) and control characters, which would put the run somewhere else."""
    bad = [why for why, hit in (("a path separator", any(sep in name for sep in ("/", "\\", os.sep))),
                                ("a leading dot", name.startswith(".")), ("'..'", ".." in name),
                                ("a control character", any(ord(c) < 32 for c in name))) if hit]
    if bad:
        raise ValueError(f"--name {name!r}: contains {' and '.join(bad)}; expected a plain folder name such as "
                         f"'irra_sdm' (the run goes to <output_dir>/<dataset_name>/<time>_<name>)")


def resolve_method(method: str, loss_names: str) -> Tuple[str, List[str]]:
    """(the method, the loss names as a list) from ``--method`` and ``--loss_names``: every method's spellings are
    read (RDE's ``TAL`` is ``tal``). With the default ``--method``, loss names that are not its own select the method
    that has them (an RDE loss name selects rde, as before methods were plug-ins): the one that has them all, else the
    one that has those the default lacks. Unknown names raise; names the method lacks are left to its checks."""
    check_method(method)
    spellings = {k: v for m in METHODS for k, v in method_options(m).LOSS_SPELLINGS.items()}
    names = [spellings.get(n.strip(), n.strip()) for n in str(loss_names).split("+") if n.strip()]
    if method == DEFAULT_METHOD:
        own = set(method_options(method).clean_loss_names(names)) <= set(method_options(method).LOSSES)
        claims = [m for m in METHODS if set(method_options(m).clean_loss_names(names)) <= set(method_options(m).LOSSES)]
        foreign = set(names) - set(method_options(method).LOSSES)
        partial = [m for m in METHODS if foreign & set(method_options(m).LOSSES)]
        if not own and (claims or len(partial) == 1):
            method = (claims or partial)[0]
    names = method_options(method).clean_loss_names(names)
    return method, parse_loss_names("+".join(names), tuple(dict.fromkeys(n for m in METHODS
                                                                          for n in method_options(m).LOSSES)))


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Normalise and cross-check options (shared by the CLI and configs loaded from disk)."""
    check_run_name(str(args.name))
    args.img_size = tuple(int(v) for v in args.img_size)
    if len(args.img_size) != 2:
        raise ValueError(f"--img_size expects two ints H W, got {args.img_size}")
    args.milestones = tuple(int(v) for v in args.milestones)
    args.metrics = tuple(dict.fromkeys(args.metrics))
    for name in args.metrics:
        check_choice("metrics", name, EXTRA_METRICS)
    args.method, tasks = resolve_method(args.method, args.loss_names)
    method = method_options(args.method)
    # --MLM (the dataset side) and 'mlm' in --loss_names (the model side) must agree: one implies the other.
    if "mlm" in tasks:
        args.MLM = True
    elif args.MLM:
        tasks.append("mlm")
    args.loss_names = "+".join(tasks)
    checks = method.check_options(args, tasks)  # the method's own first (methods/<name>/options.py)
    checks += [("loss_names", set(tasks) <= set(method.LOSSES),
                f"losses of --method {args.method}: {list(method.LOSSES)}"),
               ("temperature", args.temperature > 0, "> 0"),
               ("text_length", args.text_length >= 3, ">= 3 (start token, one word, end token)"),
               ("stride_size", args.stride_size >= 1, ">= 1"),
               ("img_size", min(args.img_size) >= 1, "[H, W] of positive ints"),
               ("batch_size", args.batch_size >= 1, ">= 1"), ("test_batch_size", args.test_batch_size >= 1, ">= 1"),
               ("num_epoch", args.num_epoch >= 1, ">= 1"), ("log_period", args.log_period >= 1, ">= 1"),
               ("stop_epoch", args.stop_epoch is None or args.stop_epoch >= 1, ">= 1 (or unset: train to --num_epoch)"),
               ("warmup_epochs", args.warmup_epochs >= 0, ">= 0"), ("num_instance", args.num_instance >= 1, ">= 1"),
               ("num_workers", args.num_workers >= 0, ">= 0"),
               ("eval_period", args.eval_period >= 1, ">= 1"), ("lr", math.isfinite(args.lr) and args.lr > 0,
                                                                 "a finite number > 0"),
               ("noisy_rate", 0.0 <= args.noisy_rate <= 1.0, "a fraction in [0, 1]"),
               ("weight_decay", math.isfinite(args.weight_decay) and args.weight_decay >= 0, "a finite number >= 0"),
               ("weight_decay_bias", math.isfinite(args.weight_decay_bias) and args.weight_decay_bias >= 0,
               "a finite number >= 0"),
               ("batch_size", args.batch_size >= 2 or not set(tasks) & set(method.CONTRASTIVE_LOSSES),
               f">= 2 with a contrastive loss ({'+'.join(t for t in tasks if t in method.CONTRASTIVE_LOSSES)}): a "
               f"batch of one sample has no negative, the loss would be a constant 0")]

    for name in ("txt_aug_word_drop_rate", "txt_aug_word_drop_apply_prob", "txt_aug_backtrans_prob"):
        checks.append((name, 0.0 <= getattr(args, name) <= 1.0, "a probability in [0, 1]"))
    checks += [("txt_aug_word_drop_apply_prob",
                args.txt_aug_word_drop_rate > 0 or args.txt_aug_word_drop_apply_prob == WORD_DROP_APPLY_PROB,
                f"{WORD_DROP_APPLY_PROB} (its default) while --txt_aug_word_drop_rate is 0 (word deletion off)"),
               ("txt_aug_word_drop_rate",
                args.txt_aug_word_drop_rate == 0 or args.txt_aug_word_drop_apply_prob > 0,
                "0 while --txt_aug_word_drop_apply_prob is 0 (word deletion never applied)"),
               ("img_aug_pool_ops", 1 <= args.img_aug_pool_ops <= len(IMG_AUG_POOL),
                f"1..{len(IMG_AUG_POOL)} (the pool: {list(IMG_AUG_POOL)})"),
               ("img_aug_pool_ops", args.img_aug_pool or args.img_aug_pool_ops == IMG_AUG_POOL_OPS,
                f"{IMG_AUG_POOL_OPS} (its default) without --img_aug_pool")]
    for name, ok, want in checks:
        if not ok:
            raise ValueError(f"--{name} {getattr(args, name)}: expected {want}")
    _warn_odd_values(args)
    for name, valid in (("optimizer", OPTIMIZERS), ("lrscheduler", LR_SCHEDULERS), ("warmup_method", WARMUP_METHODS),
                        ("sampler", SAMPLERS), ("dataset_name", DATASETS), ("val_dataset", VAL_DATASETS),
                        ("precision", PRECISIONS)):
        check_choice(name, getattr(args, name), valid)
    return freeze(args)


class Options(argparse.Namespace):
    """A checked set of options, read-only (``finalize_args`` returns one): a write raises AttributeError, so no
    code changes an option behind the others' back after setup. :meth:`replace` returns a changed copy (the values
    given are not checked again: the run's own state, such as ``output_dir``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"options are read-only once checked: cannot set {name!r} (use args.replace({name}=...), "
                             f"or default_args({name}=...) / the command line for an option)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"options are read-only once checked: cannot delete {name!r}")

    def replace(self, **changes: Any) -> "Options":
        return freeze(argparse.Namespace(**{**vars(self), **changes}))


def freeze(args: argparse.Namespace) -> Options:
    """``args``'s values as a read-only :class:`Options`."""
    out = Options.__new__(Options)
    out.__dict__.update(vars(args))
    return out


def warn_config_changes(args: argparse.Namespace, saved_config: str, logger) -> None:
    """On resume: log the options that differ from the run's saved configs.yaml (which is kept as it was)."""
    if not os.path.isfile(saved_config):
        logger.warning("resuming a run without %s", saved_config)
        return
    saved = vars(load_train_configs(saved_config))
    skip = set(RUN_STATE_KEYS) | {"output_dir"}
    diff = {k: (saved.get(k), v) for k, v in vars(args).items() if k not in skip and saved.get(k) != v}
    if diff:
        logger.warning("resuming with options that differ from " + saved_config + ": "
                       + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items())))


def config_path(path: str) -> str:
    """A run directory or its ``configs.yaml`` -> the file (FileNotFoundError naming what was expected)."""
    return run_dir.config_file(path)


def load_config_args(path: str, **overrides) -> argparse.Namespace:
    """Options of a saved run (``configs.yaml`` or its run directory, ours or the original's), typed and checked like
    ``--config``; options the file lacks get today's defaults; ``overrides`` that are not None win."""
    parser = build_parser()
    fpath = config_path(path)
    args = parser.parse_args([])
    vars(args).update(typed_config(parser, vars(load_train_configs(fpath)), fpath))
    vars(args).update({k: v for k, v in overrides.items() if v is not None})
    return finalize_args(args)


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); values from ``--config`` act as defaults."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    config_keys: set = set()
    if pre.config:
        cfg = _config_defaults(parser, pre.config)
        config_keys = set(cfg)
        parser.set_defaults(**cfg)
        pre, _ = parser.parse_known_args(argv)
    _set_method_defaults(parser, pre, config_keys)
    args = parser.parse_args(argv)
    return finalize_args(args)


def _set_method_defaults(parser: argparse.ArgumentParser, pre: argparse.Namespace, config_keys=frozenset()) -> None:
    """The chosen method's option defaults (its ``DEFAULTS``) replace the table's where the command line and the
    config file did not set them (a --config value is a default too, and wins over the method's, even when it equals
    the table's default: ``config_keys``)."""
    method, _ = (pre.method, None) if pre.method != DEFAULT_METHOD else resolve_method(pre.method, pre.loss_names)
    configured = {a.dest: a.default for a in parser._actions}
    table = build_parser()
    table_defaults = {a.dest: a.default for a in table._actions}
    parser.set_defaults(**{k: v for k, v in method_options(method).DEFAULTS.items()
                           if k not in config_keys and configured.get(k) == table_defaults.get(k)})


def default_args(**overrides) -> argparse.Namespace:
    """Every option at its default, with ``overrides`` (option=value) applied and the result checked: the Namespace
    to build parts from in a notebook or a test, e.g. ``build_model(default_args(pretrain_choice="scratch:ViT-Micro"))``."""
    parser = build_parser()
    args = parser.parse_args([])
    unknown = sorted(set(overrides) - set(vars(args)) - {"distributed"})
    if unknown:
        raise ValueError(f"default_args: unknown option(s) {unknown}; valid options are {sorted(vars(args))}")
    method = overrides.get("method", DEFAULT_METHOD)
    if method != DEFAULT_METHOD:  # the method's defaults, under the overrides
        vars(args).update(method_options(method).DEFAULTS)
    vars(args).update(overrides)
    return finalize_args(args)
