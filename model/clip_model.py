"""OpenAI CLIP (https://github.com/openai/CLIP, clip/model.py + clip/clip.py), made hackable for IRRA.

Changes from OpenAI's code (as in the original IRRA):
- the image encoders take non-square inputs ``(H, W)``; the ViT has a patch ``stride_size``;
- both image encoders and the text encoder return ALL tokens (``[B, 1+P, D]`` / ``[B, L, D]``), projected to
  ``embed_dim``; token 0 of the image output is CLIP's pooled feature (CLS for ViT, attention pool for ResNet);
- positional embeddings are resized on load (visual grid: bilinear; text: cut or 1-D linear interpolation);
- no ``logit_scale`` parameter (IRRA uses a fixed temperature);
- ``encode_text`` accepts text shorter than ``context_length``.
Also: tiny from-scratch architectures (``scratch:<arch>``) and an offline-friendly weight download.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import urllib.error
import urllib.request
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from utils.checkpoint import (CheckpointReadError, clip_state_dict_from_checkpoint, is_irra_state_dict,
                              strip_prefix_if_present, torch_load)
from utils.iotools import CONFIG_FILE_NAME, load_train_configs

logger = logging.getLogger("IRRA.model.clip_model")

# OpenAI's public CLIP weights; the second-last URL path component is the file's SHA256.
# Copied from openai/CLIP clip/clip.py (identical in the PyPI packages openai-clip 1.0.1 and clip-anytorch 2.6.0).
_MODELS: Dict[str, str] = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

DEFAULT_DOWNLOAD_ROOT = os.path.join("~", ".cache", "clip")
DOWNLOAD_TIMEOUT_S = 10.0  # socket timeout for the weight download: fail fast when offline

_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408)
# From-scratch architectures for ``pretrain_choice="scratch:<arch>"`` (randomly initialised as CLIP does).
# Text heads = transformer_width // 64 (at least 1); ViT heads = vision_width // 64; ResNet heads = width*32 // 64.
SCRATCH_ARCHS: Dict[str, Dict[str, Any]] = {
    # 64-wide, 1 vision + 1 text layer: unit tests.
    "ViT-Micro": dict(embed_dim=64, vision_layers=1, vision_width=64, vision_patch_size=16,
                      transformer_width=64, transformer_layers=1, **_TEXT_DEFAULTS),
    # 128-wide, 2 vision + 2 text layers: the CPU demo / benchmark size (same as the conformance tiny CLIP).
    "ViT-Tiny": dict(embed_dim=128, vision_layers=2, vision_width=128, vision_patch_size=16,
                     transformer_width=128, transformer_layers=2, **_TEXT_DEFAULTS),
    # ModifiedResNet with one bottleneck per stage, stem width 8 (feature dim 8*32 = 256), 128-wide 2-layer text.
    "RN-Tiny": dict(embed_dim=128, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None,
                    transformer_width=128, transformer_layers=2, **_TEXT_DEFAULTS),
    # OpenAI shapes, random weights.
    "ViT-B/16": dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16,
                     transformer_width=512, transformer_layers=12, **_TEXT_DEFAULTS),
    "ViT-B/32": dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=32,
                     transformer_width=512, transformer_layers=12, **_TEXT_DEFAULTS),
    "RN50": dict(embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None,
                 transformer_width=512, transformer_layers=12, **_TEXT_DEFAULTS),
}
SCRATCH_PREFIX = "scratch:"
RESNET_DOWNSAMPLE = 32  # ModifiedResNet's total stride: its attention-pool grid is (H // 32, W // 32)
DEFAULT_STRIDE_SIZE = 16  # --stride_size default, for a configs.yaml without it

Size2 = Union[int, Tuple[int, int], Sequence[int]]


def _pair(x: Size2) -> Tuple[int, int]:
    """int -> (x, x); (h, w) -> (h, w)."""
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


# ----------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased strides (avgpool before stride>1 convs), as CLIP's ModifiedResNet."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # all conv layers have stride 1; an avgpool is performed after the second convolution when stride > 1
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Sequential] = None
        self.stride = stride
        if stride > 1 or inplanes != planes * Bottleneck.expansion:
            # downsampling layer is prepended with an avgpool, and the subsequent convolution has stride 1
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.avgpool(out)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu3(out)


class AttentionPool2d(nn.Module):
    """QKV attention pooling over a (h, w) feature map that returns ALL tokens.

    The query is every token (mean token + h*w spatial tokens), as in OpenAI's first release; since attention is
    computed per query, output token 0 is exactly CLIP's pooled feature (query = mean token only).
    """

    def __init__(self, spacial_dim: Size2, embed_dim: int, num_heads: int, output_dim: Optional[int] = None) -> None:
        super().__init__()
        self.spacial_dim = _pair(spacial_dim)
        h, w = self.spacial_dim
        self.positional_embedding = nn.Parameter(torch.randn(h * w + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, h, w] -> [N, 1 + h*w, output_dim]."""
        x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
        x = x + self.positional_embedding[:, None, :].to(x.dtype)  # (HW+1)NC
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x,
            embed_dim_to_check=x.shape[-1],
            num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return x.permute(1, 0, 2)  # (HW+1)ND -> N(HW+1)D


class ModifiedResNet(nn.Module):
    """CLIP's ResNet (3-conv stem, avgpool, anti-aliased strides, attention pooling) for (H, W) inputs.

    forward: [B, 3, H, W] -> [B, 1 + (H//32)*(W//32), output_dim]; token 0 = CLIP's pooled image feature.
    """

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, input_resolution: Size2 = 224,
                 width: int = 64) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = _pair(input_resolution)
        h, w = self.input_resolution
        if h % 32 or w % 32:
            raise ValueError(f"ModifiedResNet needs an image size divisible by 32, got img_size={self.input_resolution}")
        # the 3-layer stem
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        # residual layers
        self._inplanes = width  # mutable, used during construction
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32  # the ResNet feature dimension
        self.spacial_dim = (h // 32, w // 32)
        self.attnpool = AttentionPool2d(self.spacial_dim, embed_dim, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(Bottleneck(self._inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.type(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)  # [B, width*32, H/32, W/32]
        return self.attnpool(x)  # [B, 1 + HW/1024, output_dim]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, returning the input dtype (handles fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _is_causal_mask(mask: Optional[torch.Tensor]) -> bool:
    """True for CLIP's text mask: a square additive mask, -inf above the diagonal and 0 elsewhere."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    return bool(torch.equal(mask, torch.full_like(mask, float("-inf")).triu_(1)))


def fused_multihead_attention(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                              is_causal: bool = False) -> torch.Tensor:
    """``attn(query, key, value, need_weights=False, attn_mask=attn_mask)[0]`` computed with
    ``F.scaled_dot_product_attention`` (fused kernels) from the module's own parameters (the state dict is the
    module's). query [Lq, B, D], key / value [L, B, D] (NLD for a ``batch_first`` module) -> [Lq, B, D] (NLD).

    The projections follow torch's: one packed projection when query, key and value are the same tensor, a q and a
    packed k/v projection when key is value, three otherwise. ``is_causal`` (query and key of the same length)
    replaces an additive causal mask (the fused kernels then skip the masked blocks). Dropout, key padding masks and
    bias_k/bias_v are not supported (CLIP and IRRA use none)."""
    if attn.dropout > 0.0 or attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
        raise ValueError("fused_multihead_attention: dropout, bias_k/bias_v, add_zero_attn and separate q/k/v "
                         "weights are not supported")
    if attn.batch_first:  # NLD -> LND, keeping which inputs are the same tensor
        same_qk, same_kv = query is key, key is value
        query = query.transpose(0, 1)
        key = query if same_qk else key.transpose(0, 1)
        value = key if same_kv else value.transpose(0, 1)
    q_len, batch, dim = query.shape
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    w_q, w_k, w_v = weight.chunk(3)
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)

    def heads_first(x: torch.Tensor, n: int) -> Tuple[torch.Tensor, ...]:
        # [L, B, n * D] -> n x [B, heads, L, D / heads]
        return x.view(x.shape[0], batch, n, heads, dim // heads).permute(2, 1, 3, 0, 4).unbind(0)

    if query is key and key is value:
        q, k, v = heads_first(F.linear(query, weight, bias), 3)
    elif key is value:
        (q,) = heads_first(F.linear(query, w_q, b_q), 1)
        k, v = heads_first(F.linear(key, weight[dim:], None if bias is None else bias[dim:]), 2)
    else:
        (q,), (k,), (v,) = (heads_first(F.linear(x, w, b), 1) for x, w, b in
                            ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # [B, heads, Lq, D/h]
    out = out.permute(2, 0, 1, 3).reshape(q_len * batch, dim)  # [Lq * B, D]
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias).view(q_len, batch, dim)
    return out.transpose(0, 1) if attn.batch_first else out


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block; input/output LND. ``attn_mask`` (additive, [ctx, ctx]) is sliced to the input.

    ``fused`` (default True): attention by ``F.scaled_dot_product_attention`` (:func:`fused_multihead_attention`,
    CLIP's causal text mask as ``is_causal``) instead of ``nn.MultiheadAttention``'s forward; the parameters and the
    state dict are the same. :meth:`attention` with ``need_weights=True`` returns the (unfused) attention weights.
    """

    def __init__(self, d_model: int, n_head: int, attn_mask: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask
        self.causal = _is_causal_mask(attn_mask)  # the mask is CLIP's causal one: is_causal in the fused path
        self.fused = True

    def attention(self, x: torch.Tensor, query_len: Optional[int] = None,
                  need_weights: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Self-attention of x [L, B, D]; with ``query_len`` only the first ``query_len`` positions are queries
        (keys/values are all L positions) and the result is [query_len, B, D]. ``need_weights``: also return the
        attention weights averaged over heads, [B, query_len, L] (``nn.MultiheadAttention``'s unfused path)."""
        q = x if query_len is None else x[:query_len]  # the same tensor when None: torch's packed q/k/v projection
        attn_mask = None
        if self.attn_mask is not None:
            n_ctx = x.shape[0]
            if n_ctx > self.attn_mask.shape[0]:
                raise ValueError(f"sequence of length {n_ctx} is longer than the attention mask ({self.attn_mask.shape[0]})")
            if self.fused and self.causal and not need_weights and q is x:
                return fused_multihead_attention(self.attn, x, x, x, is_causal=True)
            attn_mask = self.attn_mask[:q.shape[0], :n_ctx].to(dtype=x.dtype, device=x.device)
        if need_weights:
            return self.attn(q, x, x, need_weights=True, attn_mask=attn_mask)
        if self.fused:
            return fused_multihead_attention(self.attn, q, x, x, attn_mask=attn_mask)
        return self.attn(q, x, x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, x: torch.Tensor, query_len: Optional[int] = None) -> torch.Tensor:
        """x [L, B, D] -> [L, B, D]; with ``query_len``, [query_len, B, D]: the outputs of the first ``query_len``
        positions only, identical to ``forward(x)[:query_len]`` (each position's MLP and residual are its own)."""
        if query_len is None:
            x = x + self.attention(self.ln_1(x))
        else:
            x = x[:query_len] + self.attention(self.ln_1(x), query_len)  # [query_len, B, D]
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """Stack of ResidualAttentionBlocks; input/output LND.

    ``grad_checkpointing`` (default False): in training with autograd on, each block's activations are not kept
    for the backward pass but recomputed there (``torch.utils.checkpoint``, non-reentrant): less memory, about
    one more forward pass of compute, identical losses and gradients (the blocks have no dropout or other
    randomness; the RNG state is restored for the recomputation anyway). Eval / ``torch.no_grad`` run as usual.
    """

    def __init__(self, width: int, layers: int, heads: int, attn_mask: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, query_len: Optional[int] = None) -> torch.Tensor:
        """x [L, B, D] -> [L, B, D]. ``query_len``: only the first ``query_len`` output positions are needed; the
        last block then computes its queries / MLP for those positions only (its keys/values still cover all L
        positions, so the kept outputs are unchanged) and the result is [query_len, B, D]."""
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        n = len(self.resblocks)
        if n == 0:
            return x if query_len is None else x[:query_len]
        for i, block in enumerate(self.resblocks):
            block_query_len = query_len if i == n - 1 else None
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, block_query_len, use_reentrant=False)
            else:
                x = block(x, block_query_len)
        return x


def vit_grid(img_size: Size2, patch_size: int, stride_size: int) -> Tuple[int, int]:
    """``(num_y, num_x)``: the patch grid of :class:`VisionTransformer` for ``img_size`` (H, W),
    ``num_y = (H - patch_size) // stride_size + 1`` (same for x / W)."""
    height, width = _pair(img_size)
    return (height - patch_size) // stride_size + 1, (width - patch_size) // stride_size + 1


def check_image_grid(clip_state_dict: Dict[str, torch.Tensor], img_size: Size2, stride_size: int,
                     source: str = "checkpoint", config: str = "the config") -> None:
    """Raise a ValueError when the image grid of trained CLIP weights does not fit ``img_size`` / ``stride_size``.

    A trained IRRA checkpoint holds the positional embedding of the grid it was trained on; a config with another
    image size or stride would otherwise fail deep inside the positional-embedding resize (or load resized weights
    the model never saw).

    Args:
        clip_state_dict: CLIP weights in OpenAI names (``utils.checkpoint.clip_state_dict_from_checkpoint``).
        img_size: the config's ``img_size`` (H, W).
        stride_size: the config's ``stride_size`` (ViT only).
        source: the checkpoint, named in the message.
        config: the config file, named in the message.
    """
    height, width = _pair(img_size)
    if "visual.positional_embedding" in clip_state_dict and "visual.conv1.weight" in clip_state_dict:  # ViT
        patch = int(clip_state_dict["visual.conv1.weight"].shape[-1])
        n_ckpt = int(clip_state_dict["visual.positional_embedding"].shape[0]) - 1  # minus the class token
        num_y, num_x = vit_grid((height, width), patch, stride_size)
        how = f"img_size {height}x{width} with stride_size {stride_size} (patch {patch})"
    elif "visual.attnpool.positional_embedding" in clip_state_dict:  # ModifiedResNet: a 32x smaller grid
        n_ckpt = int(clip_state_dict["visual.attnpool.positional_embedding"].shape[0]) - 1  # minus the mean token
        num_y, num_x = height // 32, width // 32
        how = f"img_size {height}x{width} (ResNet: a grid of H/32 x W/32)"
    else:
        return
    if n_ckpt != num_y * num_x:
        raise ValueError(
            f"{config} does not fit {source}: the checkpoint's image encoder was trained on a grid of {n_ckpt} "
            f"patch positions, but the config's {how} implies a {num_y}x{num_x} grid of {num_y * num_x} positions. "
            f"Use the configs.yaml of the run that wrote the checkpoint (or its img_size / stride_size).")


class VisionTransformer(nn.Module):
    """ViT over (H, W) images with patch ``patch_size`` and stride ``stride_size``; returns ALL tokens projected.

    forward: [B, 3, H, W] -> [B, 1 + num_y*num_x, output_dim], num_y = (H - patch)//stride + 1 (same for x/W).
    """

    def __init__(self, input_resolution: Size2, patch_size: int, stride_size: int, width: int, layers: int,
                 heads: int, output_dim: int) -> None:
        super().__init__()
        self.input_resolution = _pair(input_resolution)  # (H, W)
        if stride_size < 1 or min(self.input_resolution) < patch_size:
            raise ValueError(f"--img_size {self.input_resolution} / --stride_size {stride_size}: the image must be at "
                             f"least one patch ({patch_size}x{patch_size}) and the stride >= 1")
        self.num_y, self.num_x = vit_grid(self.input_resolution, patch_size, stride_size)
        num_patches = self.num_x * self.num_y
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=width, kernel_size=patch_size, stride=stride_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_patches + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # shape = [*, width, num_y, num_x]
        x = x.reshape(x.shape[0], x.shape[1], -1)  # [*, width, num_y, num_x] -> [*, width, num_y*num_x]
        x = x.permute(0, 2, 1)  # shape = [*, num_y*num_x, width]
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1)  # shape = [*, num_y*num_x + 1, width]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_post(x)  # all tokens
        x = x @ self.proj  # [*, L, width] -> [*, L, output_dim]
        return x


def init_transformer_(transformer: "Transformer") -> Dict[str, float]:
    """CLIP's initialisation of a ``Transformer``'s blocks (in place); returns the stds used."""
    proj_std = (transformer.width ** -0.5) * ((2 * transformer.layers) ** -0.5)
    attn_std = transformer.width ** -0.5
    fc_std = (2 * transformer.width) ** -0.5
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    return {"proj_std": proj_std, "attn_std": attn_std, "fc_std": fc_std}


class CLIP(nn.Module):
    """CLIP with token-level outputs: forward(image, text) -> (image_feats [B, 1+P, D], text_feats [B, L, D])."""

    def __init__(self, embed_dim: int,
                 # vision
                 image_resolution: Size2, vision_layers: Union[Tuple[int, int, int, int], int], vision_width: int,
                 vision_patch_size: Optional[int], stride_size: int,
                 # text
                 context_length: int, vocab_size: int, transformer_width: int, transformer_heads: int,
                 transformer_layers: int) -> None:
        super().__init__()
        self.context_length = context_length
        if isinstance(vision_layers, (tuple, list)):
            vision_heads = vision_width * 32 // 64
            self.visual: nn.Module = ModifiedResNet(layers=vision_layers, output_dim=embed_dim, heads=vision_heads,
                                                    input_resolution=image_resolution, width=vision_width)
        else:
            vision_heads = max(vision_width // 64, 1)
            self.visual = VisionTransformer(input_resolution=image_resolution, patch_size=vision_patch_size,
                                            stride_size=stride_size, width=vision_width, layers=vision_layers,
                                            heads=vision_heads, output_dim=embed_dim)
        self.transformer = Transformer(width=transformer_width, layers=transformer_layers, heads=transformer_heads,
                                       attn_mask=self.build_attention_mask())
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            std = self.visual.attnpool.c_proj.in_features ** -0.5
            nn.init.normal_(self.visual.attnpool.q_proj.weight, std=std)
            nn.init.normal_(self.visual.attnpool.k_proj.weight, std=std)
            nn.init.normal_(self.visual.attnpool.v_proj.weight, std=std)
            nn.init.normal_(self.visual.attnpool.c_proj.weight, std=std)
            for resnet_block in [self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4]:
                for name, param in resnet_block.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)
        init_transformer_(self.transformer)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def build_attention_mask(self) -> torch.Tensor:
        """Causal additive mask [context_length, context_length]: -inf above the diagonal."""
        mask = torch.empty(self.context_length, self.context_length)
        mask.fill_(float("-inf"))
        mask.triu_(1)  # zero out the lower diagonal
        return mask

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> all tokens [B, 1+P, embed_dim] (token 0 = pooled/CLS)."""
        return self.visual(image.type(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids (L <= context_length) -> all tokens [B, L, embed_dim] after ln_final and projection."""
        n_ctx = text.shape[-1]
        if n_ctx > self.context_length:
            raise ValueError(f"text has {n_ctx} tokens, more than the model's context_length={self.context_length}")
        x = self.token_embedding(text).type(self.dtype)  # [batch_size, n_ctx, d_model]
        x = x + self.positional_embedding[:n_ctx].type(self.dtype)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        x = x @ self.text_projection  # [B, L, width] -> [B, L, embed_dim]
        return x

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        return image_features, text_features

    def load_param(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Copy an OpenAI-format CLIP state dict into this model (resizing positional embeddings).

        Keys absent from this model (``logit_scale``, ``input_resolution``...) are ignored; a parameter of this
        model missing from ``state_dict`` or a shape that cannot be reconciled raises a ValueError.
        """
        param_dict = _unwrap_state_dict(state_dict)
        own = self.state_dict()
        loaded = set()
        with torch.no_grad():
            for k, v in param_dict.items():
                if k not in own:
                    continue
                target = own[k]
                if v.shape != target.shape:
                    if k == "visual.positional_embedding" and isinstance(self.visual, VisionTransformer):
                        v = resize_pos_embed(v, target, self.visual.num_y, self.visual.num_x)
                    elif k == "visual.attnpool.positional_embedding" and isinstance(self.visual, ModifiedResNet):
                        v = resize_pos_embed(v, target, *self.visual.spacial_dim)
                    elif k == "positional_embedding":
                        v = resize_text_pos_embed(v, self.context_length)
                if v.shape != target.shape:
                    raise ValueError(
                        f"CLIP weight {k!r}: checkpoint shape {tuple(v.shape)} does not fit the model's "
                        f"{tuple(target.shape)} (wrong architecture for this checkpoint?)")
                target.copy_(v)
                loaded.add(k)
        missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"CLIP checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:5]}")


# ----------------------------------------------------------------------------------------------------------------
# positional-embedding resizing, precision
# ----------------------------------------------------------------------------------------------------------------
def resize_pos_embed(posemb: torch.Tensor, posemb_new: torch.Tensor, hight: int, width: int,
                     old_grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Resize a ViT/attnpool positional embedding [1 + gh*gw, D] to [1 + hight*width, D].

    Token 0 (class/mean token) is kept; the grid is resized with bilinear interpolation (align_corners=False).
    ``old_grid``: (gh, gw) of ``posemb``; None: a square grid (CLIP's, as the original assumes). ``posemb_new`` is
    only used for logging (as the original).
    """
    posemb = posemb.unsqueeze(0)  # [1+gh*gw, D] -> [1, 1+gh*gw, D]
    posemb_new = posemb_new.unsqueeze(0)
    posemb_token, posemb_grid = posemb[:, :1], posemb[0, 1:]
    if old_grid is None:
        gs_old = int(math.sqrt(len(posemb_grid)))
        old_grid = (gs_old, gs_old)
    gh, gw = old_grid
    if gh * gw != len(posemb_grid):
        raise ValueError(f"resize_pos_embed: the old grid has {len(posemb_grid)} positions, not a {gh}x{gw} grid")
    logger.info("Resized position embedding from size %s to size %s with height:%d width:%d",
                tuple(posemb.shape), tuple(posemb_new.shape), hight, width)
    dtype = posemb.dtype
    posemb_grid = posemb_grid.float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # [gh*gw, D] -> [1, D, gh, gw]
    posemb_grid = F.interpolate(posemb_grid, size=(hight, width), mode="bilinear")  # [1, D, hight, width]
    posemb_grid = posemb_grid.permute(0, 2, 3, 1).reshape(1, hight * width, -1)  # [1, D, h, w] -> [1, h*w, D]
    posemb = torch.cat([posemb_token, posemb_grid.to(dtype)], dim=1)  # [1, 1+h*w, D]
    return posemb.squeeze(0)  # [1, 1+h*w, D] -> [1+h*w, D]


def resize_text_pos_embed(posemb: torch.Tensor, context_length: int) -> torch.Tensor:
    """Text positional embedding [L_old, D] -> [context_length, D].

    Shorter: the first ``context_length`` rows (identical results for the kept positions, causal attention).
    Longer: 1-D linear interpolation along positions (``F.interpolate(mode="linear", align_corners=False)``).
    """
    old_len = posemb.shape[0]
    if context_length <= old_len:
        return posemb[:context_length].clone()
    dtype = posemb.dtype
    x = posemb.float().t().unsqueeze(0)  # [L_old, D] -> [1, D, L_old]
    x = F.interpolate(x, size=context_length, mode="linear", align_corners=False)  # [1, D, context_length]
    return x.squeeze(0).t().contiguous().to(dtype)  # [1, D, L] -> [L, D]


def convert_weights(model: nn.Module) -> None:
    """Convert applicable model parameters to fp16 (OpenAI's rule): Conv/Linear, MultiheadAttention projections,
    and attributes named ``text_projection`` / ``proj``. Embeddings, LayerNorms, positional embeddings stay fp32."""

    def _convert_weights_to_fp16(layer: nn.Module) -> None:
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            layer.weight.data = layer.weight.data.half()
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.half()
        if isinstance(layer, nn.MultiheadAttention):
            for attr in [*[f"{s}_proj_weight" for s in ["in", "q", "k", "v"]], "in_proj_bias", "bias_k", "bias_v"]:
                tensor = getattr(layer, attr)
                if tensor is not None:
                    tensor.data = tensor.data.half()
        for name in ["text_projection", "proj"]:
            if hasattr(layer, name):
                attr = getattr(layer, name)
                if isinstance(attr, torch.Tensor):
                    attr.data = attr.data.half()

    model.apply(_convert_weights_to_fp16)


# ----------------------------------------------------------------------------------------------------------------
# weights: download / load / build
# ----------------------------------------------------------------------------------------------------------------
def available_models() -> List[str]:
    """Names of the OpenAI CLIP models that can be downloaded."""
    return list(_MODELS.keys())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, root: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> str:
    """Return the local path of ``url`` under ``root``, downloading it if absent (SHA256 checked).

    The expected SHA256 is the second-last path component of the URL. An existing file with the wrong checksum,
    or a download with the wrong checksum, is an error (no re-download loop). If the file is absent and the
    download fails (offline...), one FileNotFoundError names the expected path and the URL to fetch by hand.
    """
    root = os.path.expanduser(root)
    filename = os.path.basename(url)
    expected_sha256 = url.split("/")[-2]
    download_target = os.path.join(root, filename)
    if os.path.exists(download_target) and not os.path.isfile(download_target):
        raise RuntimeError(f"{download_target} exists and is not a regular file")
    if os.path.isfile(download_target):
        got = _sha256(download_target)
        if got != expected_sha256:
            raise RuntimeError(
                f"{download_target} exists but its SHA256 {got} does not match the expected {expected_sha256}; "
                f"delete it and fetch {url} again")
        return download_target

    from tqdm import tqdm

    tmp = download_target + ".part"
    try:
        os.makedirs(root, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as source, open(tmp, "wb") as output:
            total = source.info().get("Content-Length")
            with tqdm(total=int(total) if total else None, ncols=80, unit="iB", unit_scale=True,
                      desc=filename) as loop:
                while True:
                    buffer = source.read(1 << 16)
                    if not buffer:
                        break
                    output.write(buffer)
                    loop.update(len(buffer))
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise FileNotFoundError(
            f"CLIP weights not found at {download_target} and the download failed ({e}). Without network access, "
            f"fetch {url} by hand and place it at {download_target} (or pass the file path as --pretrain_choice)."
        ) from None
    got = _sha256(tmp)
    if got != expected_sha256:
        os.remove(tmp)
        raise RuntimeError(f"downloaded {url} but its SHA256 {got} does not match the expected {expected_sha256}")
    os.replace(tmp, download_target)
    return download_target


def _unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """Accept a state dict or a {"state_dict": sd} / {"model": sd} wrapper."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"expected a CLIP state dict, got {type(obj).__name__}")
    return obj


def load_clip_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict from a TorchScript archive (OpenAI's .pt), a plain state dict, or a {"state_dict": ...} /
    {"model": ...} wrapper (an IRRA checkpoint comes back whole: ``base_model.*``, ``classifier.*``...). Tensors are
    returned on CPU in their stored dtype. A file torch cannot read raises
    :class:`~utils.checkpoint.CheckpointReadError` naming it (see :func:`utils.checkpoint.torch_load`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    except (RuntimeError, ValueError, AttributeError):
        state_dict = torch_load(path)  # not TorchScript: a torch.save file (weights_only=True)
    try:
        sd = _unwrap_state_dict(state_dict)
    except ValueError as e:
        raise CheckpointReadError(f"{path}: {e}") from None
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def is_pretrained_file(name: str) -> bool:
    """True when ``pretrain_choice`` ``name`` is read from a local file: not an OpenAI model name
    (``available_models()``, which wins over a file of the same name), not ``scratch:<arch>``, an existing file."""
    return name not in _MODELS and not name.startswith(SCRATCH_PREFIX) and os.path.isfile(name)


def load_pretrained_file(path: str, image_size: Optional[Size2] = None, stride_size: Optional[int] = None
                         ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """Weights of a ``pretrain_choice`` file: an OpenAI CLIP file (TorchScript archive or state dict, see
    :func:`load_clip_state_dict`) or an IRRA checkpoint (the original's ``best.pth`` layout
    ``{"model": {"base_model.*": ..., ...}}``, optionally with a ``module.`` prefix, or its bare state dict).

    Returns ``(clip_state_dict, irra_state_dict)``: the CLIP weights (an IRRA checkpoint's ``base_model.*``, prefix
    removed) and, for an IRRA checkpoint, its whole state dict as stored (``module.`` stripped; None for a CLIP
    file). An IRRA checkpoint is recognised by its keys (some key starts with ``base_model.``). Errors name the file.

    An IRRA checkpoint's image positional grid need not be square (384x128 -> 24x8): given ``image_size`` /
    ``stride_size`` (the model to build), its ``visual.positional_embedding`` (ViT) or
    ``visual.attnpool.positional_embedding`` (ResNet) is resized here when the number of positions differs, the
    checkpoint's grid read from the configs.yaml next to it or inferred (:func:`_checkpoint_pos_grid`); a CLIP
    file's square grid is resized by :meth:`CLIP.load_param`.
    """
    sd = strip_prefix_if_present(load_clip_state_dict(path), "module.")
    irra_sd = sd if is_irra_state_dict(sd) else None
    clip_sd = clip_state_dict_from_checkpoint(sd) if irra_sd is not None else sd
    try:
        _cfg_from_state_dict(clip_sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e} (expected an OpenAI CLIP file or an IRRA checkpoint)") from None
    if irra_sd is not None and image_size is not None and stride_size is not None:
        key, new_grid, grid_of = _image_pos_grid(clip_sd, image_size, stride_size)
        old = clip_sd[key]
        n_old = old.shape[0] - 1
        if n_old != new_grid[0] * new_grid[1]:
            old_grid = _checkpoint_pos_grid(path, n_old, new_grid, grid_of)
            new = old.new_empty(1 + new_grid[0] * new_grid[1], old.shape[1])  # only its shape is used (logging)
            clip_sd[key] = resize_pos_embed(old, new, *new_grid, old_grid=old_grid)
    return clip_sd, irra_sd


def _image_pos_grid(state_dict: Dict[str, torch.Tensor], image_size: Size2, stride_size: int
                    ) -> Tuple[str, Tuple[int, int], Callable[[Size2, int], Tuple[int, int]]]:
    """(key of the image positional embedding, its grid for ``image_size`` / ``stride_size``, the function
    (image_size, stride_size) -> grid) for the CLIP weights ``state_dict`` (ViT or ModifiedResNet)."""
    if "visual.proj" in state_dict:  # ViT, as VisionTransformer
        patch = state_dict["visual.conv1.weight"].shape[-1]

        def grid_of(size: Size2, stride: int) -> Tuple[int, int]:
            h, w = _pair(size)
            return (h - patch) // stride + 1, (w - patch) // stride + 1

        return "visual.positional_embedding", grid_of(image_size, stride_size), grid_of

    def grid_of_rn(size: Size2, stride: int) -> Tuple[int, int]:  # as ModifiedResNet (stride unused)
        h, w = _pair(size)
        return h // RESNET_DOWNSAMPLE, w // RESNET_DOWNSAMPLE

    return "visual.attnpool.positional_embedding", grid_of_rn(image_size, stride_size), grid_of_rn


def _checkpoint_pos_grid(path: str, n: int, new_grid: Tuple[int, int],
                         grid_of: Callable[[Size2, int], Tuple[int, int]]) -> Tuple[int, int]:
    """The (height, width) grid of the ``n`` image positions of IRRA checkpoint ``path``.

    1. The ``configs.yaml`` next to it (written by our runs and the original's): the grid of its img_size /
       stride_size, when it has ``n`` positions.
    2. Otherwise the one grid of ``n`` positions among: the width of ``new_grid``, its height, its aspect ratio, a
       square (e.g. 4x2 for 8 positions and a new 6x2 grid). None or several -> ValueError naming the file.
    """
    cfg_file = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE_NAME)
    if os.path.isfile(cfg_file):
        try:
            cfg = vars(load_train_configs(cfg_file))
            grid = grid_of(cfg["img_size"], int(cfg.get("stride_size", DEFAULT_STRIDE_SIZE)))
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("%s: cannot read img_size / stride_size (%s): the image grid of %s is inferred",
                           cfg_file, e, path)
        else:
            if grid[0] * grid[1] == n:
                logger.info("%s: image positional grid %dx%d (img_size %s in %s)", path, grid[0], grid[1],
                            tuple(cfg["img_size"]), cfg_file)
                return grid
            logger.warning("%s: img_size %s gives a %dx%d grid but the checkpoint has %d image positions: ignored",
                           cfg_file, tuple(cfg["img_size"]), grid[0], grid[1], n)
    ny, nx = new_grid
    candidates = []
    if n % nx == 0:
        candidates.append((n // nx, nx))  # same width (e.g. 384x128 -> 256x128)
    if n % ny == 0:
        candidates.append((ny, n // ny))  # same height
    h = round(math.sqrt(n * ny / nx))
    if h > 0 and n % h == 0 and h * nx == (n // h) * ny:
        candidates.append((h, n // h))  # same aspect ratio
    s = math.isqrt(n)
    if s * s == n:
        candidates.append((s, s))  # square (CLIP's)
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) != 1:
        raise ValueError(
            f"{path}: cannot tell the image grid of its {n} positional embeddings (its img_size) to resize them to "
            f"{ny}x{nx}: {'candidates ' + str(candidates) if candidates else 'no grid fits'}; put the configs.yaml "
            f"of the run that wrote it (with img_size and stride_size) next to it, or train at its img_size")
    logger.info("%s: image positional grid %dx%d assumed (no configs.yaml next to it gives its img_size)", path,
                *candidates[0])
    return candidates[0]


def _cfg_from_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Derive CLIP's architecture from an OpenAI state dict (as OpenAI's build_model)."""
    vit = "visual.proj" in state_dict
    try:
        if vit:
            vision_width = state_dict["visual.conv1.weight"].shape[0]
            vision_layers: Union[int, Tuple[int, ...]] = len(
                [k for k in state_dict if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
            vision_patch_size = state_dict["visual.conv1.weight"].shape[-1]
            grid_size = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            image_resolution = vision_patch_size * grid_size
        else:
            counts = [len(set(k.split(".")[2] for k in state_dict if k.startswith(f"visual.layer{b}")))
                      for b in [1, 2, 3, 4]]
            vision_layers = tuple(counts)
            vision_width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
            output_width = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision_patch_size = None
            image_resolution = output_width * 32
        embed_dim = state_dict["text_projection"].shape[1]
        context_length = state_dict["positional_embedding"].shape[0]
        vocab_size = state_dict["token_embedding.weight"].shape[0]
        transformer_width = state_dict["ln_final.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an OpenAI CLIP state dict: missing {e}") from None
    transformer_heads = max(transformer_width // 64, 1)
    transformer_layers = len(set(k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks")))
    return dict(embed_dim=embed_dim, image_resolution=image_resolution, vision_layers=vision_layers,
                vision_width=vision_width, vision_patch_size=vision_patch_size, context_length=context_length,
                vocab_size=vocab_size, transformer_width=transformer_width, transformer_heads=transformer_heads,
                transformer_layers=transformer_layers)


def build_CLIP_from_openai_pretrained(name: str, image_size: Size2, stride_size: int, jit: bool = False,
                                      download_root: Optional[str] = None, text_length: Optional[int] = None,
                                      state_dict: Optional[Dict[str, torch.Tensor]] = None
                                      ) -> Tuple[CLIP, Dict[str, Any]]:
    """Build a CLIP for ``image_size`` (H, W) / ``stride_size`` from OpenAI weights, a local file or a scratch arch.

    name: an OpenAI model name (``available_models()``; downloaded to ``download_root`` or ~/.cache/clip), a path to
    a CLIP checkpoint file or an IRRA checkpoint (its ``base_model.*`` weights, see :func:`load_pretrained_file`), or ``scratch:<arch>`` (``SCRATCH_ARCHS``, random init). ``text_length`` sets the text
    context length (positional embedding cut or interpolated); None keeps the checkpoint's. ``jit`` is accepted
    for compatibility and ignored (always the eager model). ``state_dict``: CLIP weights already in memory (e.g.
    the ``base_model.*`` of a trained IRRA checkpoint); architecture and weights then come from it and ``name`` is
    not read. Returns (model in fp32, model_cfg).
    """
    del jit
    if state_dict is not None:
        model_cfg = _cfg_from_state_dict(state_dict)
    elif name.startswith(SCRATCH_PREFIX):
        arch = name[len(SCRATCH_PREFIX):]
        if arch not in SCRATCH_ARCHS:
            raise ValueError(f"unknown scratch architecture {arch!r}; valid: "
                             f"{', '.join(SCRATCH_PREFIX + a for a in SCRATCH_ARCHS)}")
        model_cfg = dict(SCRATCH_ARCHS[arch])
        model_cfg["transformer_heads"] = max(model_cfg["transformer_width"] // 64, 1)
        state_dict = None
    else:
        if name in _MODELS:
            model_path = _download(_MODELS[name], download_root or DEFAULT_DOWNLOAD_ROOT)
        elif os.path.isfile(name):
            model_path = name
        else:
            raise ValueError(
                f"pretrain_choice {name!r}: not an OpenAI CLIP model name, a {SCRATCH_PREFIX}<arch> or an existing "
                f"file; OpenAI models: {available_models()}; scratch: "
                f"{[SCRATCH_PREFIX + a for a in SCRATCH_ARCHS]}")
        state_dict, _ = load_pretrained_file(model_path, image_size, stride_size)  # IRRA: its base_model.*
        model_cfg = _cfg_from_state_dict(state_dict)
    model_cfg["image_resolution"] = _pair(image_size)
    model_cfg["stride_size"] = stride_size
    if text_length is not None:
        model_cfg["context_length"] = int(text_length)
    model = CLIP(**model_cfg)
    if state_dict is not None:
        model.load_param(state_dict)
    return model, model_cfg
