"""Optimizer and lr-scheduler construction (as the original IRRA ``solver/build.py``).

Which parameter gets which learning rate and weight decay is the method's decision (``Method.param_groups``: IRRA's
rule is in ``methods/irra``); this module builds the optimizer over those groups and the epoch schedule.
"""
import logging
from argparse import Namespace
from typing import Dict, List

import torch
from torch import nn

from methods.registry import get_method
from utils.choices import OPTIMIZERS

from .lr_scheduler import LRSchedulerWithWarmup

logger = logging.getLogger("IRRA.solver")


def build_param_groups(args: Namespace, model: nn.Module) -> List[Dict]:
    """One param group per trainable parameter with its own lr and weight decay, as ``args.method`` decides
    (``Method.param_groups``)."""
    return get_method(args.method).param_groups(args, model)


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
        raise ValueError(f"unknown optimizer {args.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
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
