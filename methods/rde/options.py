"""RDE's options (Qin et al., CVPR 2024; README "Noisy correspondences: RDE"): its loss names (one of them selects
``--method rde``), its option group and its checks. Leaf module: imports nothing of the project."""
from __future__ import annotations

import argparse
import re
from typing import Dict, List, Sequence, Tuple

# Our loss names -> the RDE loss type each one means (RDE's spellings are accepted in --loss_names too).
LOSS_TYPES = {"tal": "TAL", "trl": "TRL", "rde_infonce": "InfoNCE", "rde_sdm": "SDM"}
LOSSES = tuple(LOSS_TYPES)
LOSS_SPELLINGS = {v: k for k, v in LOSS_TYPES.items()}  # RDE's: TAL, TRL, InfoNCE, SDM
CONTRASTIVE_LOSSES = LOSSES
DEFAULTS: dict = {}
# The run-name suffix RDE's run_rde.sh puts into --loss_names (dropped beside an RDE loss).
RUN_NAME = re.compile(r"^sr[0-9.]+_tau[0-9.]+_margin[0-9.]+_n[0-9.]+$")

# RDE's GaussianMixture settings (its processor.py: "precise" when noisy_rate > 0.4 or the dataset is RSTPReid).
GMM_SETTINGS: Dict[str, Dict[str, float]] = {
    "fast": {"max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4},
    "precise": {"max_iter": 100, "tol": 1e-4, "reg_covar": 1e-6},
}


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("RDE (--method rde, or an RDE loss in --loss_names: tal, trl, rde_infonce, "
                                      "rde_sdm)")
    group.add_argument("--select_ratio", type=float, default=0.3, help="RDE TSE: fraction of tokens selected")
    group.add_argument("--tau", type=float, default=0.015, help="RDE TAL/TRL temperature")
    group.add_argument("--margin", type=float, default=0.1, help="RDE TAL/TRL margin")
    group.add_argument("--tse_embed_dim", type=int, default=1024, help="RDE TSE output width (RDE's 1024)")
    group.add_argument("--tse_lr", type=float, default=1e-3,
                       help="lr of the TSE layers, biases included (RDE hard-codes 1e-3)")
    group.add_argument("--gmm_setting", default="fast", choices=tuple(GMM_SETTINGS),
                       help="CCD GaussianMixture: fast (max_iter 10, tol 1e-2, reg_covar 5e-4) or precise (100, 1e-4, "
                            "1e-6). RDE picked precise when noisy_rate > 0.4 or on RSTPReid (reading the true rate)")
    group.add_argument("--ccd_batch_size", type=int, default=None,
                       help="batch of the CCD loss pass (default --batch_size: RDE's; the per-sample losses use the "
                            "batch's other samples as negatives, so the batch size changes them)")
    group.add_argument("--rde_train_eval_mode", default=False, action="store_true",
                       help="reproduce RDE's trap: training runs in eval mode after the CCD pass (TSE BatchNorm "
                            "statistics frozen; RDE issue #8)")


def clean_loss_names(names: Sequence[str]) -> List[str]:
    """RDE's run_rde.sh appends its run name to the loss type (``TAL+sr0.3_tau0.015_margin0.1_n0.2``): dropped."""
    return [n for n in names if not RUN_NAME.match(n)]


def check_options(args: argparse.Namespace, tasks: Sequence[str]) -> List[Tuple[str, bool, str]]:
    """(option, ok, expected) of RDE's checks (utils/options.py raises on the first that fails)."""
    return [("loss_names", len(tasks) == 1 and not args.MLM,
             f"one of {list(LOSSES)} alone: an RDE loss takes no other loss{' and no --MLM' if args.MLM else ''} "
             f"(RDE silently ignored id / mlm, its issue #17; here it is an error)"),
            ("select_ratio", 0.0 < args.select_ratio <= 1.0, "in (0, 1]"), ("tau", args.tau > 0, "> 0"),
            ("margin", args.margin >= 0, ">= 0"), ("tse_embed_dim", args.tse_embed_dim >= 2, ">= 2"),
            ("tse_lr", args.tse_lr > 0, "> 0"),
            ("ccd_batch_size", args.ccd_batch_size is None or args.ccd_batch_size >= 2, ">= 2 (or unset)"),
            ("gmm_setting", args.gmm_setting in GMM_SETTINGS, f"one of {list(GMM_SETTINGS)}")]
