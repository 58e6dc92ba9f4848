"""The data-dependent lengths of IRRA's fast path (``model/build.py:IRRA``): the caption cut and the MLM query length /
masked-token count, computed on the host before a batch goes to the device (no host sync in the step), optionally
rounded up to few distinct sizes (``--length_bucket``)."""
from __future__ import annotations

from typing import Dict

import torch


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def caption_cut(caption_ids: torch.Tensor, multiple: int = 1) -> int:
    """[B, L] ids -> L' = 1 + the largest EOT position (EOT = argmax id) in the batch, rounded up to a multiple of
    ``multiple`` (at most L; ``--length_bucket``: few distinct shapes). Exact: with causal attention and EOT pooling
    the EOT features do not depend on later tokens. Reads a value of the tensor: a device-to-host copy
    when ``caption_ids`` is on an accelerator (the trainer computes it from the batch on the host)."""
    exact = int(caption_ids.argmax(dim=-1).max()) + 1
    return min(round_up(exact, multiple), caption_ids.shape[1])


def mlm_token_bucket(n: int, multiple: int = 8) -> int:
    """Number of masked tokens -> the MLM head's padded token count: ``n`` itself for ``multiple`` 1; else a multiple
    of ``multiple`` up to 4 * ``multiple``, then 4 sizes per doubling (with 8: 8, 16, 24, 32, 40, 48, 56, 64, 80, 96,
    112, 128, 160, ...): at most 25 % padding above 4 * ``multiple``, few distinct shapes."""
    if multiple == 1:
        return n
    if n <= 4 * multiple:
        return max(multiple, round_up(n, multiple))
    top = 1 << (n - 1).bit_length()  # top / 2 < n <= top
    return round_up(n, top // 8)


def mlm_lengths(mlm_labels: torch.Tensor, multiple: int = 1) -> Dict[str, int]:
    """[B, L] MLM labels (0 = not masked) -> ``mlm_query_len``: 1 + the last masked position in the batch, rounded up
    to a multiple of ``multiple`` (at most L; 1 without masked tokens), and ``mlm_tokens``: the number of masked
    tokens padded by :func:`mlm_token_bucket` (at most B * mlm_query_len). One device-to-host copy when the labels
    are on an accelerator."""
    batch, length = mlm_labels.shape
    masked = mlm_labels != 0
    position = torch.arange(1, length + 1, device=mlm_labels.device)  # 1-based, 0 = none
    count, last = torch.stack([masked.sum(), (masked * position).max()]).tolist()
    query_len = min(round_up(last, multiple), length) if count else 1
    return {"mlm_query_len": query_len, "mlm_tokens": min(mlm_token_bucket(count, multiple), batch * query_len)}


def host_lengths(batch: Dict[str, torch.Tensor], multiple: int = 1) -> Dict[str, int]:
    """The fast path's data-dependent lengths, computed from the batch while it is on the host (before it is copied
    to the device), so that the training step needs no device-to-host copy: ``caption_cut`` (:func:`caption_cut`)
    and, with MLM labels, ``mlm_query_len`` / ``mlm_tokens`` (:func:`mlm_lengths`); ``multiple``: the length bucket.
    Add them to the batch (:meth:`IRRA.host_lengths` uses the model's ``--length_bucket``)."""
    out = {"caption_cut": caption_cut(batch["caption_ids"], multiple)}
    if "mlm_labels" in batch:
        out.update(mlm_lengths(batch["mlm_labels"], multiple))
    return out


def masked_first(labels: torch.Tensor, size: int) -> torch.Tensor:
    """[B, L] labels (0 = not masked) -> [size] flat indices into [B * L]: the masked positions in row-major order,
    then unmasked ones (label 0, ignored by the loss) up to ``size`` (<= B * L). The same positions as ``labels != 0``
    as a boolean index, in the same order, without a data-dependent shape (no host sync)."""
    unmasked = (labels.reshape(-1) == 0).to(torch.uint8)  # [B*L]
    return torch.argsort(unmasked, stable=True)[:size]
