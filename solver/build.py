"""Optimizer and lr-scheduler construction (as the original IRRA ``solver/build.py``).

Random-init modules rule: parameters of modules that are *not* loaded from pretrained CLIP are trained
with a larger lr (``args.lr * args.lr_factor``). They are recognised by name: keys containing ``cross``
(``cross_attn``, ``cross_modal_transformer``, ``ln_pre_t/i``... of the cross-modal former), ``classifier``
(ID head) and ``mlm_head``. Biases get ``args.lr * args.bias_lr_factor`` and ``args.weight_decay_bias``;
the rules are applied in this order: ``cross`` -> ``bias`` -> ``classifier``/``mlm_head`` (so a bias of
``cross_attn`` ends up at ``lr * bias_lr_factor``, a bias of ``classifier`` at ``lr * lr_factor``, both with
``weight_decay_bias``). RDE's TSE layers (``visul_emb_layer`` / ``texual_emb_layer``) get ``args.tse_lr`` last (RDE's
hard-coded 1e-3; biases keep ``weight_decay_bias``). A new random-init module should have ``cross`` in its name to get the larger lr.
"""
import logging
from argparse import Namespace
from typing import Dict, List

import torch
from torch import nn

from utils.choices import OPTIMIZERS

from .lr_scheduler import LRSchedulerWithWarmup

logger = logging.getLogger("IRRA.solver")

VALID_OPTIMIZERS = OPTIMIZERS
RANDOM_INIT_KEYS = ("classifier", "mlm_head")  # get lr * lr_factor regardless of the bias rule
TSE_KEYS = ("visul_emb_layer", "texual_emb_layer")  # RDE's TSE layers: --tse_lr, after every other rule


def build_param_groups(args: Namespace, model: nn.Module) -> List[Dict]:
    """One param group per trainable parameter with its own lr and weight decay (see module docstring)."""
    params = []
    for key, value in model.named_parameters():
        if not value.requires_grad:
            continue
        lr = args.lr
        weight_decay = args.weight_decay
        if "cross" in key:
            # use large learning rate for random initialized cross modal module
            lr = args.lr * args.lr_factor
        if "bias" in key:
            lr = args.lr * args.bias_lr_factor
            weight_decay = args.weight_decay_bias
        if any(k in key for k in RANDOM_INIT_KEYS):
            lr = args.lr * args.lr_factor
        if any(k in key for k in TSE_KEYS):  # RDE: its TSE layers (biases too) at a fixed lr, 1e-3 in RDE
            lr = args.tse_lr
        params.append({"params": [value], "lr": lr, "weight_decay": weight_decay})
    return params


def merge_param_groups(groups: List[Dict]) -> List[Dict]:
    """Join groups with equal (lr, weight_decay) into one, in order of first appearance (parameters keep the model's
    order within a group). Each parameter keeps its lr and weight decay, so every update is the same; the
    optimizer's multi-tensor kernels then see a few large groups instead of one launch set per tensor."""
    merged: Dict[tuple, Dict] = {}
    for g in groups:
        key = (g["lr"], g["weight_decay"])
        if key not in merged:
            merged[key] = {"params": [], "lr": g["lr"], "weight_decay": g["weight_decay"]}
        merged[key]["params"].extend(g["params"])
    return list(merged.values())


def build_optimizer(args: Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over ``build_param_groups(args, model)``; other names raise ValueError."""
    params = build_param_groups(args, model)
    if args.merge_param_groups:
        params = merge_param_groups(params)
    # fused=None keeps torch's default implementation (the original's numbers exactly)
    fused = True if args.fused_optimizer else None
    if args.optimizer == "SGD":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, fused=fused)
    elif args.optimizer == "Adam":
        optimizer = torch.optim.Adam(
            params, lr=args.lr, betas=(args.alpha, args.beta), eps=args.adam_eps, fused=fused
        )
    elif args.optimizer == "AdamW":
        optimizer = torch.optim.AdamW(
            params, lr=args.lr, betas=(args.alpha, args.beta), eps=args.adamw_eps, fused=fused
        )
    else:
        raise ValueError(f"unknown optimizer {args.optimizer!r}; valid optimizers: {', '.join(VALID_OPTIMIZERS)}")
    logger.info("Built %s optimizer with %d param groups%s%s", args.optimizer, len(params),
                " (merged by lr and weight decay)" if args.merge_param_groups else "", " (fused)" if fused else "")
    return optimizer


def build_lr_scheduler(args: Namespace, optimizer: torch.optim.Optimizer) -> LRSchedulerWithWarmup:
    """``LRSchedulerWithWarmup`` configured from args (mode = ``args.lrscheduler``, total = ``args.num_epoch``)."""
    return LRSchedulerWithWarmup(
        optimizer,
        milestones=args.milestones,
        gamma=args.gamma,
        warmup_factor=args.warmup_factor,
        warmup_epochs=args.warmup_epochs,
        warmup_method=args.warmup_method,
        total_epochs=args.num_epoch,
        mode=args.lrscheduler,
        target_lr=args.target_lr,
        power=args.power,
    )
