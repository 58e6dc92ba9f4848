"""TBPS-CLIP's options (``--method tbps``; TBPS's config/config.yaml as defaults, its s.config.yaml as
``--simplified``). Leaf module: imports nothing of the project.

TBPS's ``experiment`` switches are loss names: ``nitc`` (N-ITC, always on in TBPS), ``mvs`` (N-ITC of the second
augmented view ``aug1``, TBPS's ``mvs_image``), ``ss`` (SimCLR on two strong views), ``citc``, ``ritc``, ``id``.
Its schedule maps onto the core's options: ``lr`` 1e-4, ``lr_start`` = lr * ``--warmup_factor`` (0.01 -> 1e-6),
``lr_end`` = ``--target_lr`` (5e-6), ``epoch_warmup`` = ``--warmup_epochs`` (1), ``ratio_factor`` = ``--lr_factor``
(5), betas = (``--alpha``, ``--beta``) = (0.9, 0.98), eps ``--adamw_eps`` 1e-8, ``--weight_decay`` 0.02.
"""
from __future__ import annotations

import argparse
from typing import List, Sequence, Tuple

LOSSES = ("nitc", "mvs", "ss", "citc", "ritc", "id")
LOSS_SPELLINGS: dict = {}
CONTRASTIVE_LOSSES = ("nitc", "mvs", "ss", "citc", "ritc")
FULL_LOSSES = "nitc+mvs+ss+citc+ritc"  # config/config.yaml
SIMPLIFIED_LOSSES = "nitc+ritc"  # config/s.config.yaml (--simplified)

DEFAULTS: dict = {
    "loss_names": FULL_LOSSES,
    "pretrain_choice": "ViT-B/16",
    "img_size": (224, 224),  # experiment.input_resolution
    "text_length": 77,
    "MLM": False,
    "img_aug": False,
    "img_aug_pool": True,  # TBPS's Choose: 2 of 6 ops per view
    "img_aug_pool_ops": 2,
    "txt_aug_word_drop_rate": 0.05,  # eda_alpha
    "txt_aug_word_drop_apply_prob": 1.0,
    "txt_aug_backtrans_prob": 0.1,  # backtrans_p (needs captions_bt in the annotations; refused without)
    "batch_size": 80,
    "num_epoch": 5,
    "optimizer": "AdamW",
    "lr": 1e-4,
    "warmup_epochs": 1,
    "warmup_factor": 0.01,  # lr_start 1e-6 = lr * 0.01
    "target_lr": 5e-6,  # lr_end
    "lr_factor": 5.0,  # ratio_factor (cross / classifier / mlm_head)
    "weight_decay": 0.02,
    "weight_decay_bias": 0.0,
    "alpha": 0.9,
    "beta": 0.98,
    "adamw_eps": 1e-8,
    "sampler": "random",
    "id_loss_weight": 1.0,  # id_ratio
}


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TBPS-CLIP (--method tbps; losses: nitc, mvs, ss, citc, ritc, id)")
    group.add_argument("--simplified", default=False, action="store_true",
                       help=f"TBPS's s.config.yaml: --loss_names {SIMPLIFIED_LOSSES} (N-ITC + R-ITC only)")
    group.add_argument("--softlabel_ratio", type=float, default=0.5,
                       help="N-ITC: weight alpha of the model's own softmax in the targets, ramped linearly from 0 "
                            "over the first epoch's iterations (TBPS's model.softlabel_ratio)")
    group.add_argument("--nitc_ratio", type=float, default=1.0, help="weight of the N-ITC loss")
    group.add_argument("--ss_ratio", type=float, default=0.4, help="weight of the SS (SimCLR) loss")
    group.add_argument("--simclr_temperature", type=float, default=0.1, help="SS temperature")
    group.add_argument("--simclr_mlp", type=int, nargs="+", default=(512, 128, 512), metavar="WIDTH",
                       help="SS projection head widths IN HIDDEN OUT; IN is the embedding width (TBPS: 512 128 512); "
                            "a TBPS checkpoint's own head wins")
    group.add_argument("--citc_lambda1", type=float, default=0.25, help="C-ITC in-modal weight")
    group.add_argument("--citc_lambda2", type=float, default=0.25, help="C-ITC cross-modal weight")
    group.add_argument("--citc_ratio", type=float, default=0.1, help="weight of the C-ITC loss")
    group.add_argument("--ritc_eps", type=float, default=1e-2, help="R-ITC: eps added to the targets")
    group.add_argument("--ritc_ratio", type=float, default=1.0, help="weight of the R-ITC loss")
    group.add_argument("--tbps_dropout", type=float, default=0.05,
                       help="attention dropout of the text transformer (TBPS's experiment.dropout)")
    group.add_argument("--head_width", type=int, default=64,
                       help="attention heads = width // head_width in both towers (CLIP's and TBPS's rule, 64; the "
                            "heads cannot be read from weights)")


def clean_loss_names(names: Sequence[str]) -> List[str]:
    return list(names)


def check_options(args: argparse.Namespace, tasks: Sequence[str]) -> List[Tuple[str, bool, str]]:
    """(option, ok, expected) of TBPS's checks."""
    simplified_ok = not args.simplified or "+".join(sorted(tasks)) in ("+".join(sorted(FULL_LOSSES.split("+"))),
                                                                       "+".join(sorted(SIMPLIFIED_LOSSES.split("+"))))
    return [("loss_names", "nitc" in tasks, "to include nitc (TBPS always trains with N-ITC)"),
            ("simplified", simplified_ok, f"without --loss_names (it means --loss_names {SIMPLIFIED_LOSSES})"),
            ("MLM", not args.MLM, "off: TBPS's MLM is not ported (its tokenizer's masking module is missing)"),
            ("softlabel_ratio", 0.0 <= args.softlabel_ratio <= 1.0, "in [0, 1]"),
            ("simclr_temperature", args.simclr_temperature > 0, "> 0"),
            ("ritc_eps", args.ritc_eps > 0, "> 0"),
            ("tbps_dropout", 0.0 <= args.tbps_dropout < 1.0, "in [0, 1)"),
            ("head_width", args.head_width >= 1, ">= 1"),
            ("simclr_mlp", len(args.simclr_mlp) == 3 and min(args.simclr_mlp) >= 1,
             "three widths >= 1 (IN HIDDEN OUT)")]


def loss_set(args: argparse.Namespace, tasks: Sequence[str]) -> Tuple[str, ...]:
    """The losses a run trains with: ``--simplified`` means N-ITC + R-ITC."""
    return tuple(SIMPLIFIED_LOSSES.split("+")) if args.simplified else tuple(tasks)
