"""RDE (Qin et al., CVPR 2024, "Noisy-Correspondence Learning for Text-to-Image Person Re-identification") on this
codebase's CLIP: the BGE branch (CLS / EOT features, as IRRA) plus the TSE branch (model/CrossEmbeddingLayer_tse.py),
trained with RDE's per-sample losses weighted by the consensus clean labels of CCD (methods/rde/ccd.py).

Attribute names and state-dict keys are RDE's (``base_model.*``, ``visul_emb_layer.*``, ``texual_emb_layer.*``), so
RDE's released checkpoints load. What differs from RDE's code:
- the TSE layers need the head-averaged attention of each encoder's LAST block only. RDE asked every block for its
  weights, which rules out fused attention kernels; here a forward pre-hook on the last block takes that block's
  input and :func:`block_attention` recomputes the weights from it (``softmax(Q K^T / sqrt(d) + mask)`` from
  ``ln_1(x)`` and the block's own in_proj weights, averaged over heads). Every block still runs its own attention
  implementation (fused or not), and the weights only pick tokens (top-k indices), so no gradient flows through them;
- the TSE input width is the backbone's embedding width (RDE: 512), its output width ``--tse_embed_dim`` (1024);
- a ModifiedResNet image encoder works too: the image attention is its attention pool's (recomputed likewise);
- captions are encoded at their full ``--text_length`` (the TSE text layer's k depends on the length, as RDE);
- under DDP the losses are over the global batch (features, pids and label_hat gathered, as IRRA's here), and the TSE
  BatchNorm statistics in train mode too (GlobalBatchNorm1d: N processes train as one).
Retrieval ranks by (S_bge + S_tse) / 2 (:func:`joint_features`): feature sets ``bge``, ``tse`` and ``bge+tse`` (the
default) of ``methods/rde``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from model import objectives
from model.clip_model import ModifiedResNet, Transformer, build_CLIP_from_openai_pretrained
from model.CrossEmbeddingLayer_tse import TexualEmbeddingLayer, VisualEmbeddingLayer
from methods.rde.options import LOSS_TYPES
from utils.comm import gather_with_grad, get_world_size, scale_grad

logger = logging.getLogger("IRRA.model.rde")


def joint_features(bge: torch.Tensor, tse: torch.Tensor) -> torch.Tensor:
    """[N, D] BGE and [N, D'] TSE features -> [N, D + D'] unit rows whose dot products are (S_bge + S_tse) / 2, the
    cosines of each branch averaged (RDE's retrieval score): ``cat(bge / |bge|, tse / |tse|) / sqrt(2)``."""
    return torch.cat([F.normalize(bge.float(), dim=-1), F.normalize(tse.float(), dim=-1)], dim=-1) / math.sqrt(2)


def block_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged self-attention weights of a ``ResidualAttentionBlock`` on its input x [L, B, D] -> [B, L, L]
    (float32; the block's causal mask, if any, applied), computed from ``ln_1(x)`` and the block's in_proj weights."""
    attn = block.attn
    L, B, D = x.shape
    heads = attn.num_heads
    h = block.ln_1(x).float()
    q, k, _ = F.linear(h, attn.in_proj_weight.float(), attn.in_proj_bias.float()).chunk(3, dim=-1)  # [L, B, D] each
    q = q.reshape(L, B * heads, D // heads).transpose(0, 1)  # [L, B, D] -> [B*heads, L, hd]
    k = k.reshape(L, B * heads, D // heads).transpose(0, 1)  # [L, B, D] -> [B*heads, L, hd]
    logits = q @ k.transpose(1, 2) / math.sqrt(D // heads)  # [B*heads, L, L]
    if getattr(block, "attn_mask", None) is not None:
        logits = logits + block.attn_mask[:L, :L].to(device=x.device, dtype=logits.dtype)
    return logits.softmax(dim=-1).reshape(B, heads, L, L).mean(dim=1)  # [B*heads, L, L] -> [B, L, L]


def attnpool_attention(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention weights of a ModifiedResNet ``AttentionPool2d`` on its input x [N, C, h, w] ->
    [N, 1+h*w, 1+h*w] (token 0 = the mean token, the pooled feature's query)."""
    x = x.flatten(start_dim=2).permute(2, 0, 1).float()  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
    x = x + pool.positional_embedding[:, None, :].float()
    L, N, C = x.shape
    heads = pool.num_heads
    q = F.linear(x, pool.q_proj.weight.float(), pool.q_proj.bias.float())
    k = F.linear(x, pool.k_proj.weight.float(), pool.k_proj.bias.float())
    q = q.reshape(L, N * heads, C // heads).transpose(0, 1)  # [L, N, C] -> [N*heads, L, hd]
    k = k.reshape(L, N * heads, C // heads).transpose(0, 1)  # [L, N, C] -> [N*heads, L, hd]
    logits = q @ k.transpose(1, 2) / math.sqrt(C // heads)  # [N*heads, L, L]
    return logits.softmax(dim=-1).reshape(N, heads, L, L).mean(dim=1)  # -> [N, L, L]


class RDE(nn.Module):
    """RDE model. ``forward(batch)`` -> {"bge_loss", "tse_loss", "temperature"} given ``batch["label_hat"]`` (1 =
    consensus clean; absent = every pair clean); ``compute_per_loss(batch)`` -> (lossA, lossB, simsA, simsB).

    Options read from ``args``: loss_names (one of ``LOSS_TYPES``), select_ratio, tau, margin, temperature,
    tse_embed_dim, img_size, stride_size, text_length, pretrain_choice, clip_download_root, local_negatives.
    ``num_classes`` is unused (RDE has no identity head): the builders' signature.
    """

    def __init__(self, args: argparse.Namespace, num_classes: Optional[int] = None,
                 clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.current_task = [n.strip() for n in str(args.loss_names).split("+") if n.strip()]
        if len(self.current_task) != 1 or self.current_task[0] not in LOSS_TYPES:
            raise ValueError(f"--loss_names {args.loss_names!r}: RDE takes exactly one of {list(LOSS_TYPES)}")
        self.loss_type = LOSS_TYPES[self.current_task[0]]
        logger.info("Training RDE with the %s loss", self.loss_type)
        self.tau = float(args.tau)
        self.margin = float(args.margin)
        self.select_ratio = float(args.select_ratio)
        self.local_negatives = bool(args.local_negatives)
        self.base_model, base_cfg = build_CLIP_from_openai_pretrained(
            args.pretrain_choice, args.img_size, args.stride_size, download_root=args.clip_download_root,
            text_length=args.text_length, state_dict=clip_state_dict)
        self.embed_dim = base_cfg["embed_dim"]
        self.register_buffer("logit_scale", torch.ones([]) * (1 / args.temperature), persistent=False)
        self.visul_emb_layer = VisualEmbeddingLayer(self.embed_dim, args.tse_embed_dim, args.select_ratio)
        self.texual_emb_layer = TexualEmbeddingLayer(self.embed_dim, args.tse_embed_dim, args.select_ratio)

    # ----- attention of the last blocks -----
    def _attention_sources(self) -> Dict[str, Tuple[nn.Module, callable]]:
        visual = self.base_model.visual
        if isinstance(visual, ModifiedResNet):
            image = (visual.attnpool, attnpool_attention)
        else:
            image = (visual.transformer.resblocks[-1], block_attention)
        return {"image": image, "text": (self.base_model.transformer.resblocks[-1], block_attention)}

    @contextlib.contextmanager
    def _capture_attention(self, *which: str) -> Iterator[Dict[str, torch.Tensor]]:
        """While active, the head-averaged attention of the last block of the named encoders ("image", "text") is
        computed from that block's input and stored in the yielded dict (the first call only: a checkpointed block's
        recomputation in backward does not overwrite it)."""
        out: Dict[str, torch.Tensor] = {}
        handles = []
        sources = self._attention_sources()
        for key in which:
            module, fn = sources[key]

            def hook(mod, inputs, key=key, fn=fn):
                if key not in out:
                    with torch.no_grad():
                        out[key] = fn(mod, inputs[0])
            handles.append(module.register_forward_pre_hook(hook))
        try:
            yield out
        finally:
            for h in handles:
                h.remove()

    def last_block_attention(self, images: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None
                             ) -> Dict[str, torch.Tensor]:
        """The head-averaged attention weights of the last block of each encoder given input ({"image": [B, 1+P,
        1+P], "text": [B, L, L]}), as the TSE layers receive them."""
        keys = [k for k, v in (("image", images), ("text", text)) if v is not None]
        with torch.no_grad(), self._capture_attention(*keys) as att:
            if images is not None:
                self.base_model.encode_image(images)
            if text is not None:
                self.base_model.encode_text(text.long())
        return att

    # ----- encoders -----
    def _image_tokens(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with self._capture_attention("image") as att:
            x = self.base_model.encode_image(image)  # [B, 1+P, D]
        return x, att["image"]

    def _text_tokens(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with self._capture_attention("text") as att:
            x = self.base_model.encode_text(text.long())  # [B, L, D]
        return x, att["text"]

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> BGE feature [B, D] float (CLS token)."""
        return self.base_model.encode_image(image)[:, 0, :].float()

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> BGE feature [B, D] float (EOT token)."""
        x = self.base_model.encode_text(text.long())
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)].float()

    def encode_image_tse(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> TSE feature [B, tse_embed_dim] float."""
        x, atten = self._image_tokens(image)
        return self.visul_emb_layer(x, atten).float()

    def encode_text_tse(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> TSE feature [B, tse_embed_dim] float."""
        x, atten = self._text_tokens(text)
        return self.texual_emb_layer(x, text, atten).float()

    def encode_image_both(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass -> (BGE [B, D], TSE [B, tse_embed_dim]) float."""
        x, atten = self._image_tokens(image)
        return x[:, 0, :].float(), self.visul_emb_layer(x, atten).float()

    def encode_text_both(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass -> (BGE [B, D], TSE [B, tse_embed_dim]) float."""
        x, atten = self._text_tokens(text)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)].float(), self.texual_emb_layer(x, text, atten).float()

    # ----- losses -----
    def _branch_features(self, batch: Dict[str, torch.Tensor]):
        images, caption_ids = batch["images"], batch["caption_ids"]
        with self._capture_attention("image", "text") as att:
            image_feats, text_feats = self.base_model(images, caption_ids)  # [B, 1+P, D], [B, L, D]
        i_feats = image_feats[:, 0, :].float()
        t_feats = text_feats[torch.arange(text_feats.shape[0]), caption_ids.argmax(dim=-1)].float()
        i_tse_f = self.visul_emb_layer(image_feats, att["image"])
        t_tse_f = self.texual_emb_layer(text_feats, caption_ids, att["text"])
        return i_feats, t_feats, i_tse_f, t_tse_f

    def compute_per_loss(self, batch: Dict[str, torch.Tensor]):
        """Per-sample losses of the batch's pairs (no reduction): (lossA [B] BGE branch, lossB [B] TSE branch,
        simsA [B], simsB [B] the matched pairs' cosines), detached. Negatives are the batch's own samples."""
        i_feats, t_feats, i_tse_f, t_tse_f = self._branch_features(batch)
        kw = dict(tau=self.tau, margin=self.margin, loss_type=self.loss_type, logit_scale=self.logit_scale)
        lossA, simsA = objectives.compute_per_loss(i_feats, t_feats, batch["pids"], **kw)
        lossB, simsB = objectives.compute_per_loss(i_tse_f, t_tse_f, batch["pids"], **kw)
        return lossA.detach(), lossB.detach(), simsA.detach(), simsB.detach()

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """batch: images [B, 3, H, W], caption_ids [B, L], pids [B], label_hat [B] (optional) -> losses."""
        ret: Dict[str, torch.Tensor] = {"temperature": 1 / self.logit_scale}
        i_feats, t_feats, i_tse_f, t_tse_f = self._branch_features(batch)
        pids = batch["pids"]
        label_hat = batch.get("label_hat")
        label_hat = torch.ones_like(i_feats[:, 0]) if label_hat is None else label_hat.to(i_feats.device).float()
        world = 1 if self.local_negatives else get_world_size()
        if world > 1:  # [b, ...] per rank -> [world * b, ...]: the losses see the global batch (see module docstring)
            i_feats, t_feats, i_tse_f, t_tse_f, pids, label_hat = (
                gather_with_grad(t) for t in (i_feats, t_feats, i_tse_f, t_tse_f, pids, label_hat))
        bge, tse = objectives.compute_rbs(i_feats, t_feats, i_tse_f, t_tse_f, pids, label_hat=label_hat,
                                          margin=self.margin, tau=self.tau, loss_type=self.loss_type,
                                          logit_scale=self.logit_scale)
        ret["bge_loss"] = scale_grad(bge, world)
        ret["tse_loss"] = scale_grad(tse, world)
        return ret

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the image (ViT) and text transformers' blocks (see IRRA's)."""
        transformers = [self.base_model.transformer]
        visual_transformer = getattr(self.base_model.visual, "transformer", None)
        if isinstance(visual_transformer, Transformer):
            transformers.append(visual_transformer)
        for transformer in transformers:
            transformer.grad_checkpointing = bool(enable)


__all__ = ["RDE", "block_attention", "attnpool_attention", "joint_features"]
