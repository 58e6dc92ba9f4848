"""The CLIP network: its modules, ``CLIP``, ``convert_weights`` and ``build_CLIP_from_openai_pretrained``.

OpenAI CLIP (https://github.com/openai/CLIP, clip/model.py + clip/clip.py), made hackable for IRRA.

Changes from OpenAI's code (as in the original IRRA):
- the image encoders take non-square inputs ``(H, W)``; the ViT has a patch ``stride_size``;
- both image encoders and the text encoder return ALL tokens (``[B, 1+P, D]`` / ``[B, L, D]``), projected to
  ``embed_dim``; token 0 of the image output is CLIP's pooled feature (CLS for ViT, attention pool for ResNet);
- positional embeddings are resized on load (visual grid: bilinear; text: cut or 1-D linear interpolation);
- no ``logit_scale`` parameter (IRRA uses a fixed temperature);
- ``encode_text`` accepts text shorter than ``context_length``.
Tiny from-scratch architectures (``scratch:<arch>``), the checked weight download, reading CLIP files and IRRA
checkpoints, and the positional-embedding resizing are in :mod:`model.pretrained` (re-exported here where the
original defined them).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# Weights (reading, download, architecture from a state dict, positional-embedding resizing) are in model/pretrained.py;
# the names the original defined here are re-exported so that code written against it imports unchanged.
from model.pretrained import (_MODELS, RESNET_DOWNSAMPLE, SCRATCH_ARCHS, SCRATCH_PREFIX,  # noqa: F401 (re-exports)
                              Size2, _download, _pair, _unwrap_state_dict, available_models,
                              clip_config_from_state_dict, image_grid, load_pretrained, resize_pos_embed,
                              resize_text_pos_embed)


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
        if h % RESNET_DOWNSAMPLE or w % RESNET_DOWNSAMPLE:
            raise ValueError(f"ModifiedResNet needs an image size divisible by {RESNET_DOWNSAMPLE}, got "
                             f"img_size={self.input_resolution}")
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
        self.spacial_dim = image_grid(self.input_resolution, None)  # (H // 32, W // 32)
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
        self.num_y, self.num_x = image_grid(self.input_resolution, patch_size, stride_size)
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
        model missing from ``state_dict`` or a shape that cannot be reconciled raises a ValueError (the
        resize-then-strict loading policy, see utils/checkpoint.py). A non-square image grid of trained weights is
        resized before (``model.pretrained.resize_image_pos_embed``); here an old image grid is taken as square.
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
# precision
# ----------------------------------------------------------------------------------------------------------------
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


def build_CLIP_from_openai_pretrained(name: str, image_size: Size2, stride_size: int, jit: bool = False,
                                      download_root: Optional[str] = None, text_length: Optional[int] = None,
                                      state_dict: Optional[Dict[str, torch.Tensor]] = None,
                                      old_grid: Optional[Tuple[int, int]] = None) -> Tuple[CLIP, Dict[str, Any]]:
    """Build a CLIP for ``image_size`` (H, W) / ``stride_size`` from OpenAI weights, a local file or a scratch arch.

    name: an OpenAI model name (``available_models()``; downloaded to ``download_root`` or ~/.cache/clip), a path to
    a CLIP checkpoint file or an IRRA checkpoint (its ``base_model.*`` weights; ``old_grid``: the image grid it was
    trained on, inferred when None), or ``scratch:<arch>`` (``SCRATCH_ARCHS``, random init): read by
    :func:`model.pretrained.load_pretrained`. ``text_length`` sets the text context length (positional embedding cut
    or interpolated); None keeps the checkpoint's. ``state_dict``: CLIP weights already in memory (e.g. the
    ``base_model.*`` of a trained IRRA checkpoint); architecture and weights then come from it and ``name`` is not
    read. ``jit`` is the original's parameter and has no effect: the model is always the eager one (a TorchScript
    archive's weights are read as a state dict). Returns (model in fp32, model_cfg).
    """
    if state_dict is not None:
        model_cfg = clip_config_from_state_dict(state_dict)
    else:
        model_cfg, state_dict = load_pretrained(name, image_size, stride_size, download_root, old_grid=old_grid)
    model_cfg["image_resolution"] = _pair(image_size)
    model_cfg["stride_size"] = stride_size
    if text_length is not None:
        model_cfg["context_length"] = int(text_length)
    model = CLIP(**model_cfg)
    if state_dict is not None:
        model.load_param(state_dict)
    return model, model_cfg
