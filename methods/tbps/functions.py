"""TBPS-CLIP's small functions, with TBPS's names and signatures (Cao et al., AAAI 2024, Flame-Chasers/TBPS-CLIP).

- :func:`pre_caption` (``misc/caption_dataset.py``): the caption cleaning applied to training and test captions;
- :func:`tokenize` (``text_utils/tokenizer.py``): CLIP's BPE, SOT + ids + EOT zero-padded, a long caption cut to
  SOT + its first ``context_length - 2`` ids + EOT (the EOT is kept; the same cut as ``utils.simple_tokenizer``);
- :func:`interpolate_text` / :func:`resize_pos_embed` (``misc/build.py``): the positional embeddings of CLIP weights
  resized to the text length / the image grid;
- :func:`cosine_scheduler` (``misc/build.py``): the per-iteration learning rates.
"""
from __future__ import annotations

import re
from typing import List, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from model.pretrained import resize_pos_embed  # noqa: F401  (TBPS's resize_pos_embed(posemb, posemb_new, hight, width))
from utils.simple_tokenizer import get_tokenizer, tokenize as _tokenize_one

# TBPS-CLIP builds its datasets with max_words=77 (misc/data.py); its function's own default is 50.
PRE_CAPTION_MAX_WORDS = 77
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """TBPS's caption cleaning: lower case, each of ``.!"()*#:;~`` to a space, runs of 2+ whitespace characters to
    one space, trailing newlines and outer spaces stripped, then at most ``max_words`` space-separated words."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77) -> torch.LongTensor:
    """Captions -> ids [len(texts), context_length] (SOT, BPE ids, EOT, zeros; a long caption keeps SOT, its first
    ``context_length - 2`` ids and EOT)."""
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"tokenize: context_length must be >= 2 (SOT and EOT), got {context_length}")
    tok = get_tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)  # [N, L]
    for i, text in enumerate(texts):
        out[i] = _tokenize_one(text, tok, text_length=context_length, truncate=True)
    return out


def interpolate_text(pos_embed_checkpoint: torch.Tensor, target_dim: int = 77) -> torch.Tensor:
    """Text positional embedding [n_ctx, D] -> [target_dim, D]: the first (SOT) and last (EOT) rows are kept, the
    n_ctx - 2 rows between are linearly interpolated (``align_corners=False``) to target_dim - 2 rows."""
    if pos_embed_checkpoint.size(0) == target_dim:
        return pos_embed_checkpoint
    if target_dim < 2 or pos_embed_checkpoint.size(0) < 3:
        raise ValueError(f"interpolate_text: cannot resize {pos_embed_checkpoint.size(0)} positions to {target_dim}")
    start_token = pos_embed_checkpoint[:1, :]  # [1, D]
    end_token = pos_embed_checkpoint[-1:, :]  # [1, D]
    pos_tokens = pos_embed_checkpoint[1:-1, :].unsqueeze(0).permute(0, 2, 1)  # [n-2, D] -> [1, D, n-2]
    pos_tokens = F.interpolate(pos_tokens, size=target_dim - 2, mode="linear")  # [1, D, target-2]
    pos_tokens = pos_tokens.squeeze(0).t()  # [1, D, target-2] -> [target-2, D]
    return torch.cat([start_token, pos_tokens, end_token], dim=0)  # [target, D]


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                     start_warmup_value: float = 0.0) -> List[float]:
    """Per-iteration values: ``warmup_epochs * niter_per_ep`` values linearly from ``start_warmup_value`` to
    ``base_value`` (both ends included), then a half cosine from ``base_value`` towards ``final_value`` over the
    remaining iterations (value at step i of n: final + (base - final) * (1 + cos(pi * i / n)) / 2).
    Length ``epochs * niter_per_ep``."""
    if epochs < 1 or niter_per_ep < 1 or not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"cosine_scheduler: need epochs >= 1, niter_per_ep >= 1 and 0 <= warmup_epochs <= epochs, "
                         f"got epochs={epochs}, niter_per_ep={niter_per_ep}, warmup_epochs={warmup_epochs}")
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    n = max(len(iters), 1)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / n))
    return np.concatenate((warmup, schedule)).tolist()
