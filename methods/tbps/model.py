"""TBPS-CLIP's model (``model/tbps_model.py:CLIP``) on this codebase's CLIP modules, with TBPS's attribute names
(``visual.*``, ``encode_text.*``, ``simclr_mlp.*``, ``classifier.*``, ``logit_scale``), so that TBPS's checkpoints
load as they are.

TBPS's choices kept: ``visual.conv1`` frozen; attention dropout (``--tbps_dropout``, 0.05) in the text transformer
only; a learned logit scale (log-parameter initialised at log(1/0.07); its exp is clamped at 100 by writing the
clamped value into the forward's tensor, so the parameter still gets the gradient of the clamped value, as TBPS);
``simclr_mlp`` (Linear-ReLU-Linear) for SS; an optional ID classifier (std 0.001, bias 0).
Not ported: MLM (``experiment.mlm``; TBPS's MLM tokenizer imports a ``text_utils/mask_tokens.py`` that the
repository does not contain) and MixGen (off in both of TBPS's configs).

What differs from TBPS's code, with the same numbers (float rounding aside):
- the no-gradient "_s" features of N-ITC: TBPS encodes images and captions a second time under ``no_grad``. The
  image encoder has no randomness, so the image twins here are the features detached; the captions are encoded again
  only while text dropout is active (training with ``dropout > 0``), else detached too;
- captions are cut to the batch's longest (causal attention and EOT pooling make this exact);
- global negatives under DDP (TBPS: ``use_gather``): every loss but ID is computed over the global batch on every
  rank, with gradients through this rank's samples scaled by the world size (``utils.comm.scale_grad``) and the
  logit scale's scaled back by 1/world, so N processes compute the one-process gradient (TBPS's AllGather, which
  all-reduces the gradient, does the same; its ``is_using_distributed()`` is always True, so one process crashes).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.tbps import losses as L
from model.clip_model import LayerNorm, ResidualAttentionBlock, Transformer, VisionTransformer, init_transformer_
from utils.comm import gather_with_grad, get_world_size, scale_grad

logger = logging.getLogger("IRRA.model.tbps")

LOGIT_SCALE_INIT = 1 / 0.07
LOGIT_SCALE_MAX = 100.0


@dataclass
class TBPSArch:
    """The architecture (inferred from weights by :func:`methods.tbps.checkpoint.arch_from_state_dict`)."""

    embed_dim: int
    image_size: Tuple[int, int]
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    simclr_mlp: Optional[Tuple[int, int, int]] = None  # (in, hidden, out); None: no SS head
    num_classes: Optional[int] = None  # None: no ID classifier


@dataclass
class TBPSLossConfig:
    """TBPS's ``experiment`` switches and ratios (defaults: its config/config.yaml)."""

    nitc_ratio: float = 1.0
    mvs_image: bool = True
    ss: bool = True
    ss_ratio: float = 0.4
    simclr_temperature: float = 0.1
    citc: bool = True
    citc_lambda1: float = 0.25
    citc_lambda2: float = 0.25
    citc_ratio: float = 0.1
    ritc: bool = True
    ritc_eps: float = 1e-2
    ritc_ratio: float = 1.0
    id: bool = False
    id_ratio: float = 1.0
    local_negatives: bool = False  # under DDP: each rank's own batch only (not TBPS)
    names: Tuple[str, ...] = field(default=(), repr=False)


class TextTransformer(nn.Module):
    """TBPS's text tower (``model/text_transformer.py``): CLIP's text transformer with attention dropout.

    forward: ids [B, L] (L <= context_length) -> features at the EOT token (the argmax id) [B, embed_dim]."""

    def __init__(self, embed_dim: int, context_length: int, vocab_size: int, width: int, heads: int, layers: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.context_length = context_length
        self.dropout = float(dropout)
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)  # causal, additive
        self.transformer = Transformer(width=width, layers=layers, heads=heads, attn_mask=mask)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.normal(mean=0, std=0.02, size=(context_length, width)))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        init_transformer_(self.transformer)  # TBPS's (CLIP's) initialisation
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        self.fused = True
        self.train(True)

    def train(self, mode: bool = True) -> "TextTransformer":
        """Attention dropout is on in training only; the fused attention kernels (no dropout) serve otherwise."""
        super().train(mode)
        active = mode and self.dropout > 0
        for block in self.transformer.resblocks:
            assert isinstance(block, ResidualAttentionBlock)
            block.attn.dropout = self.dropout if active else 0.0
            block.fused = self.fused and not active
        return self

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        n_ctx = text.shape[-1]
        if n_ctx > self.context_length:
            raise ValueError(f"text has {n_ctx} tokens, more than the model's context_length={self.context_length}")
        dtype = self.positional_embedding.dtype
        x = self.token_embedding(text).type(dtype)  # [B, L, width]
        x = x + self.positional_embedding[:n_ctx].type(dtype)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # [B, width] at EOT
        return x @ self.text_projection  # [B, embed_dim]


def build_mlp(in_dim: int = 512, mlp_dim: int = 512, out_dim: int = 512) -> nn.Sequential:
    """TBPS's ``_build_mlp``: Linear(in, mlp) - ReLU - Linear(mlp, out) (state-dict keys 0.* and 2.*)."""
    return nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU(inplace=True), nn.Linear(mlp_dim, out_dim))


def cut_captions(caption_ids: torch.Tensor) -> torch.Tensor:
    """ids [B, L] -> [B, l], l = 1 + the last EOT position of the batch (exact: causal attention, EOT pooling)."""
    return caption_ids[:, :int(caption_ids.argmax(dim=-1).max()) + 1]


class TBPS(nn.Module):
    """TBPS-CLIP. ``forward(batch, alpha)`` returns TBPS's loss keys, each multiplied by its ratio.

    Args:
        arch: the architecture.
        losses: which losses and their ratios.
        dropout: the text transformer's attention dropout (TBPS's ``experiment.dropout``, 0.05).
    """

    def __init__(self, arch: TBPSArch, losses: Optional[TBPSLossConfig] = None, dropout: float = 0.05) -> None:
        super().__init__()
        self.arch = arch
        self.losses = losses if losses is not None else TBPSLossConfig()
        self.embed_dim = arch.embed_dim
        self.visual = VisionTransformer(input_resolution=arch.image_size, patch_size=arch.patch_size,
                                        stride_size=arch.patch_size, width=arch.vision_width,
                                        layers=arch.vision_layers, heads=arch.vision_heads, output_dim=arch.embed_dim)
        nn.init.normal_(self.visual.positional_embedding, std=0.01)
        init_transformer_(self.visual.transformer)
        self.visual.conv1.requires_grad_(False)  # TBPS: freeze_conv1
        self.encode_text = TextTransformer(arch.embed_dim, arch.context_length, arch.vocab_size, arch.text_width,
                                           arch.text_heads, arch.text_layers, dropout)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(LOGIT_SCALE_INIT))
        if self.losses.ss:
            if arch.simclr_mlp is None:
                raise ValueError("TBPS: the SS loss needs simclr_mlp dims (in, hidden, out)")
            if arch.simclr_mlp[0] != arch.embed_dim:
                raise ValueError(f"--simclr_mlp {list(arch.simclr_mlp)}: its input width must be the embedding width "
                                 f"{arch.embed_dim}")
            self.simclr_mlp = build_mlp(*arch.simclr_mlp)
        if self.losses.id:
            if not arch.num_classes:
                raise ValueError("TBPS: the ID loss needs the number of training identities")
            self.classifier = nn.Linear(arch.embed_dim, arch.num_classes)
            nn.init.normal_(self.classifier.weight.data, std=0.001)
            nn.init.constant_(self.classifier.bias.data, val=0.0)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the projected CLS token [B, embed_dim] (not normalised)."""
        return self.visual(image.type(self.dtype))[:, 0, :]  # [B, 1+P, D] -> [B, D]

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) with its value clamped at 100 and the gradient of exp at the clamped value (TBPS)."""
        logit_scale = self.logit_scale.exp()
        logit_scale.data = torch.clamp(logit_scale.data, max=LOGIT_SCALE_MAX)
        return logit_scale

    def forward(self, batch: Dict[str, torch.Tensor], alpha: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """batch: ``images`` (TBPS's ``image``), ``aug1``, ``aug_ss_1``, ``aug_ss_2`` [B, 3, H, W] (the views the
        losses switched on use), ``caption_ids`` [B, L] (captions already augmented and tokenized), ``pids`` (TBPS's
        ``id``) [B]; TBPS's key names are accepted too. alpha: N-ITC's soft-label weight (None: the batch's
        ``alpha``, which the training hook puts there)."""
        cfg = self.losses
        if alpha is None:
            alpha = float(batch["alpha"])
        ret: Dict[str, torch.Tensor] = {}
        world = 1 if cfg.local_negatives else get_world_size()

        def gather(x: torch.Tensor) -> torch.Tensor:
            return gather_with_grad(x) if world > 1 else x

        cut = batch.get("caption_cut")  # from host_lengths (the trainer, on the host): no device-to-host copy here
        text = batch["caption_ids"][:, :cut] if cut is not None else cut_captions(batch["caption_ids"])
        ids = batch["pids"] if "pids" in batch else batch["id"]
        image_features = self.encode_image(batch["images"] if "images" in batch else batch["image"])  # [B, D]
        text_features = self.encode_text(text)  # [B, D]
        image_norm = gather(F.normalize(image_features))  # [N, D]
        text_norm = gather(F.normalize(text_features))
        with torch.no_grad():
            text_s = self.encode_text(text) if self.training and self.encode_text.dropout > 0 else text_features
            image_s_norm = image_norm.detach()
            text_s_norm = gather(F.normalize(text_s.detach()))
        all_ids = gather(ids)
        sim_targets = L.sim_targets_from_ids(all_ids, all_ids)  # [N, N]
        logit_scale = scale_grad(self.scale(), 1.0 / world)  # the global losses' gradient is scaled by world below

        if cfg.ss:
            q_a = gather(F.normalize(self.simclr_mlp(self.encode_image(batch["aug_ss_1"])), dim=-1, p=2))  # [N, d]
            q_b = gather(F.normalize(self.simclr_mlp(self.encode_image(batch["aug_ss_2"])), dim=-1, p=2))
            labels = torch.arange(q_a.shape[0], device=q_a.device)
            ss = L.compute_simclr_loss(q_a, q_b, q_a, q_b, labels, cfg.simclr_temperature)
            ret["ss_loss"] = scale_grad(ss, world) * cfg.ss_ratio

        nitc = L.calc_contrastive(image_norm, text_norm, image_s_norm, text_s_norm, image_norm, text_norm,
                                  image_s_norm, text_s_norm, sim_targets, alpha, logit_scale)
        if cfg.mvs_image:  # MVS: the second augmented view against the same text
            image_1_norm = gather(F.normalize(self.encode_image(batch["aug1"])))
            image_1_s_norm = image_1_norm.detach()
            nitc_1 = L.calc_contrastive(image_1_norm, text_norm, image_1_s_norm, text_s_norm, image_1_norm,
                                        text_norm, image_1_s_norm, text_s_norm, sim_targets, alpha, logit_scale)
            nitc = (nitc + nitc_1) / 2
        ret["nitc_loss"] = scale_grad(nitc, world) * cfg.nitc_ratio

        if cfg.citc:
            citc = L.compute_citc(image_norm, text_norm, logit_scale, cfg.citc_lambda1, cfg.citc_lambda2)
            ret["citc_loss"] = scale_grad(citc, world) * cfg.citc_ratio
        if cfg.ritc:
            ritc = L.compute_ritc(image_norm, text_norm, image_norm, text_norm, sim_targets, logit_scale, cfg.ritc_eps)
            ret["ritc_loss"] = scale_grad(ritc, world) * cfg.ritc_ratio
        if cfg.id:  # this rank's samples (DDP's averaging makes it the global mean)
            id_loss = L.compute_id(self.classifier(image_features), self.classifier(text_features), ids)
            ret["id_loss"] = id_loss * cfg.id_ratio
        ret["temperature"] = 1 / logit_scale.detach()  # logged (not a loss)
        return ret

    @staticmethod
    def host_lengths(batch: Dict[str, torch.Tensor]) -> Dict[str, int]:
        """``{"caption_cut": l}`` of a host-side batch (see :func:`cut_captions`), so that the step reads no length
        from the device."""
        return {"caption_cut": int(batch["caption_ids"].argmax(dim=-1).max()) + 1}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the image and text transformers' blocks (the text blocks' attention dropout
        is recomputed with the same random state: torch.utils.checkpoint restores it)."""
        self.visual.transformer.grad_checkpointing = bool(enable)
        self.encode_text.transformer.grad_checkpointing = bool(enable)

    def set_fused_attention(self, enable: bool = True) -> None:
        """Fused attention kernels in the image and text transformers (text: outside dropout only)."""
        for m in self.visual.modules():
            if isinstance(m, ResidualAttentionBlock):
                m.fused = bool(enable)
        self.encode_text.fused = bool(enable)
        self.encode_text.train(self.encode_text.training)


def sum_losses(ret: Dict[str, torch.Tensor]) -> torch.Tensor:
    """TBPS's total: the sum of the values whose key contains "loss"."""
    return sum(v for k, v in ret.items() if "loss" in k)


def vision_grid(arch: TBPSArch) -> Tuple[int, int]:
    """(rows, cols) of the image patches at ``arch.image_size``."""
    h, w = arch.image_size
    return (h - arch.patch_size) // arch.patch_size + 1, (w - arch.patch_size) // arch.patch_size + 1


__all__: Sequence[str] = ["TBPS", "TBPSArch", "TBPSLossConfig", "TextTransformer", "build_mlp", "cut_captions",
                          "sum_losses", "vision_grid", "LOGIT_SCALE_INIT", "LOGIT_SCALE_MAX"]
