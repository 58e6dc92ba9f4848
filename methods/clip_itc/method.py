"""CLIP fine-tuning with the symmetric image-text contrastive loss (``--method clip_itc``): the baseline row every
text-to-person paper reports, and the worked example of README "Adding a method".

The network is the CLIP backbone alone (``base_model``, as IRRA's, so IRRA checkpoints and CLIP files start it); the
features are the image CLS token and the text EOT token; the loss is ``model.objectives.compute_itc`` at the fixed
logit scale ``1 / --temperature``. Under DDP the features of every rank are gathered (unless ``--local_negatives``),
so N processes train as one.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import torch
from torch import nn

from methods.base import Method
from methods.irra.method import irra_param_groups
from model import objectives
from model.clip_model import build_CLIP_from_openai_pretrained
from model.pretrained import BACKBONE_PREFIX
from utils.comm import gather_with_grad, get_world_size, scale_grad


class CLIPITC(nn.Module):
    """CLIP + ITC. ``forward(batch)`` (images [B, 3, H, W], caption_ids [B, L]) -> {"itc_loss", "temperature"}."""

    def __init__(self, args: argparse.Namespace, clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        super().__init__()
        self.base_model, base_cfg = build_CLIP_from_openai_pretrained(
            args.pretrain_choice, args.img_size, args.stride_size, download_root=args.clip_download_root,
            text_length=args.text_length, state_dict=clip_state_dict)
        self.embed_dim = base_cfg["embed_dim"]
        self.local_negatives = bool(args.local_negatives)
        self.register_buffer("logit_scale", torch.ones([]) * (1 / args.temperature), persistent=False)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] float (CLS token)."""
        return self.base_model.encode_image(image)[:, 0, :].float()

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, D] float (EOT token: the largest id)."""
        x = self.base_model.encode_text(text.long())  # [B, L, D]
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)].float()

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        i_feats, t_feats = self.encode_image(batch["images"]), self.encode_text(batch["caption_ids"])
        world = 1 if self.local_negatives else get_world_size()
        if world > 1:  # [b, D] per rank -> [world * b, D]: the loss over the global batch
            i_feats, t_feats = gather_with_grad(i_feats), gather_with_grad(t_feats)
        loss = objectives.compute_itc(i_feats, t_feats, self.logit_scale)
        return {"itc_loss": scale_grad(loss, world), "temperature": 1 / self.logit_scale}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for transformer in (self.base_model.transformer, getattr(self.base_model.visual, "transformer", None)):
            if transformer is not None:
                transformer.grad_checkpointing = bool(enable)


class CLIPITCMethod(Method):
    name = "clip_itc"

    def build_model(self, args: argparse.Namespace, num_classes: int,
                    clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
        return CLIPITC(args, clip_state_dict=clip_state_dict)

    def param_groups(self, args: argparse.Namespace, model: nn.Module) -> List[Dict]:
        """IRRA's rule (biases at ``lr * bias_lr_factor`` and ``weight_decay_bias``), so the two compare."""
        return irra_param_groups(args, model)

    def checkpoint_match(self, state_dict: Dict[str, torch.Tensor]) -> int:
        """Its checkpoints hold the backbone only (``base_model.*``), as an IRRA run without id / mlm heads."""
        return int(all(k.startswith(BACKBONE_PREFIX) for k in state_dict) and bool(state_dict))


METHOD = CLIPITCMethod()
