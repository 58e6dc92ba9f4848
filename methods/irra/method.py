"""IRRA (Jiang & Ye, CVPR 2023), the default method: the network is ``model/build.py:IRRA`` (the original's path), its
losses ``model/objectives.py``; here are its parameter groups and its checkpoint format."""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from methods.base import Method
from model.build import IRRA
from model.pretrained import BACKBONE_PREFIX

RANDOM_INIT_KEYS = ("classifier", "mlm_head")  # get lr * lr_factor regardless of the bias rule


def irra_param_groups(args: argparse.Namespace, model: nn.Module,
                      lr_of: Optional[Callable[[str, float], float]] = None) -> List[Dict]:
    """One group per trainable parameter (the original ``solver/build.py``'s rule, in the model's order).

    Parameters of modules that are *not* loaded from pretrained CLIP are trained with a larger lr
    (``args.lr * args.lr_factor``), recognised by name: keys containing ``cross`` (``cross_attn``,
    ``cross_modal_transformer``, ...), ``classifier`` (ID head) and ``mlm_head``. Biases get ``args.lr *
    args.bias_lr_factor`` and ``args.weight_decay_bias``. The rules apply in this order: ``cross`` -> ``bias`` ->
    ``classifier``/``mlm_head`` (so a bias of ``cross_attn`` ends up at ``lr * bias_lr_factor``, a bias of
    ``classifier`` at ``lr * lr_factor``, both with ``weight_decay_bias``). ``lr_of(name, lr)``: a method built on
    IRRA's rule changes the lr last (RDE's TSE layers)."""
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
        if lr_of is not None:
            lr = lr_of(key, lr)
        params.append({"params": [value], "lr": lr, "weight_decay": weight_decay})
    return params


class IRRAMethod(Method):
    name = "irra"

    def build_model(self, args: argparse.Namespace, num_classes: int,
                    clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
        return IRRA(args, num_classes, clip_state_dict=clip_state_dict)

    def param_groups(self, args: argparse.Namespace, model: nn.Module) -> List[Dict]:
        return irra_param_groups(args, model)

    def checkpoint_match(self, state_dict: Dict[str, torch.Tensor]) -> int:
        """IRRA's (the original's ``best.pth`` and ours): a CLIP backbone under ``base_model.*``."""
        return int(any(k.startswith(BACKBONE_PREFIX) for k in state_dict))


METHOD = IRRAMethod()
