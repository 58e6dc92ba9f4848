"""mSD, UFineBench's mean Similarity Distribution (Zuo et al., CVPR 2024; ``Zplusdragon/UFineBench``,
``mSD_Calculator.py:mSD_rank``), computed from the ranks of the positives that ``utils.metrics.rank`` finds.

UFineBench's definition, per query (similarities ``s = sim / 2 + 0.5`` in [0, 1], ``ng`` gallery items, ``n``
positives, ``r_1 < r_2 < ... < r_n`` the 0-based ranks of the positives in descending order):

* ``pn = 1 - exp(-(mean positive s) / (mean negative s))``;
* ``SD = pn * mean_k cumsum(s * M)[r_k] / cumsum(s)[r_k]``, mSD = 100 x the mean of SD over queries.

**The published computation depends on how the gallery is stored.** Its mask ``M`` (``(indices + 1) * matches >= 1``
= ``matches``) is in rank order, but it multiplies ``s`` in storage order and the cumulative sums run over storage
order. So in the published number the "positive" similarities are those of the gallery items *stored* at the
positives' rank positions ``r_k``, and the denominators are storage-order prefix sums: permuting the gallery columns
changes mSD while R@k and mAP do not change. ``rank_order=False`` keeps that value (it compares with the paper):

    faithful:   pos_k = s[:, r_k] (storage order),  den_k = sum(s[:, :r_k + 1]) (storage order)
    rank_order: pos_k = s of the k-th best positive, den_k = sum of the r_k + 1 highest s (rank order)

and ``SD = pn * mean_k (pos_1 + ... + pos_k) / den_k`` with ``pn`` from ``sum_k pos_k`` and ``sum(s) - sum_k pos_k``.
``rank_order=True`` (``mSD_rank_order`` in reports) is the order-consistent variant: it does not depend on the
storage order (README of the conformance cases, tests/fixtures/ufine/).

Computation: chunked like ``rank`` (memory O(chunk * ng)), from the positives' ranks that ``rank`` computes anyway.
Faithful: one cumulative sum per chunk row and gathers at the ranks. Rank order: the sum of the similarities at or
above each positive, taken in the same compare pass that counts them (``utils.metrics._count_ge``). Ties: ranks are
pessimistic as ``rank``'s (a negative equal to a positive is ranked above it); the original's ``argsort`` orders
ties arbitrarily. Queries without a positive: the original gives NaN; here they are left out of mSD as of mAP. A
query whose every gallery item is a positive has no negative mean: its SD is NaN, as in the original.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch

MSD_NAMES = ("mSD", "mSD_rank_order")  # the reported keys: faithful, rank order
PREFIX_BLOCK = 32  # columns per block of the storage-order prefix sums


def block_sums(sim: torch.Tensor, block: int = PREFIX_BLOCK) -> torch.Tensor:
    """Sums of ``block`` consecutive columns (the last block may be shorter): sim [c, ng] -> [c, ceil(ng / block)]
    float64. One reduction pass (numpy's ``reduceat`` on CPU: single-threaded, no copy)."""
    c, ng = sim.shape
    if sim.device.type == "cpu" and sim.dtype in (torch.float32, torch.float64):
        out = np.add.reduceat(sim.detach().numpy(), np.arange(0, ng, block), axis=1)  # [c, nb]
        return torch.from_numpy(out.astype(np.float64, copy=False))
    nb = ng // block
    parts = [sim[:, :nb * block].reshape(c, nb, block).sum(-1, dtype=torch.float64)]  # [c, nb]
    if ng % block:
        parts.append(sim[:, nb * block:].sum(1, keepdim=True, dtype=torch.float64))  # [c, 1]
    return torch.cat(parts, 1).to(torch.float64)


def prefix_sums(sim: torch.Tensor, cols: torch.Tensor, block: int = PREFIX_BLOCK, blocks=None) -> torch.Tensor:
    """``out[i, k] = sim[i, :cols[i, k] + 1].sum()`` in float64: sim [c, ng], cols [c, P] int64 -> [c, P].

    Without a cumulative sum of the whole chunk: block sums (:func:`block_sums`, or ``blocks`` already computed with
    the same ``block``), their cumulative sum, plus the part of the column's block up to it (a [c, P, block]
    gather)."""
    c, ng = sim.shape
    blocks = block_sums(sim, block) if blocks is None else blocks  # [c, nb]
    if sim.device.type == "cpu" and sim.dtype in (torch.float32, torch.float64):  # numpy: single-threaded, few ops
        a, col, bs = sim.detach().numpy(), cols.numpy(), blocks.numpy()
        nb = col // block  # [c, P]
        before = np.take_along_axis(np.cumsum(bs, 1) - bs, nb, 1)  # [c, P] sum of the earlier blocks
        offs = np.arange(block)
        idx = np.minimum(nb[..., None] * block + offs, ng - 1).reshape(c, -1)  # [c, P * block]
        part = np.take_along_axis(a, idx, 1).reshape(*col.shape, block)  # [c, P, block]
        inside = offs <= (col - nb * block)[..., None]  # [c, P, block]
        return torch.from_numpy(before + np.where(inside, part, 0).sum(-1, dtype=np.float64))
    before = torch.cumsum(blocks, 1) - blocks  # [c, nb] sum of the earlier blocks
    b = torch.div(cols, block, rounding_mode="floor")  # [c, P] block of each column
    start = b * block  # [c, P]
    offs = torch.arange(block, device=sim.device)  # [block]
    idx = (start[..., None] + offs).clamp(max=ng - 1)  # [c, P, block]
    part = sim.gather(1, idx.view(c, -1)).view(idx.shape)  # [c, P, block]
    part = torch.where(offs <= (cols - start)[..., None], part, torch.zeros_like(part))
    return before.gather(1, b) + part.sum(-1, dtype=torch.float64)


class MSDAccumulator:
    """Sums per-query SD over the chunks of ``utils.metrics.rank`` (passed as its ``observer``).

    Args:
        faithful: compute UFineBench's published (storage-order) value, reported as ``mSD``.
        rank_order: compute the order-consistent variant, reported as ``mSD_rank_order``.
    """

    def __init__(self, faithful: bool = True, rank_order: bool = True) -> None:
        if not (faithful or rank_order):
            raise ValueError("MSDAccumulator: ask for faithful and/or rank_order")
        self.variants = tuple(n for n, on in zip(MSD_NAMES, (faithful, rank_order)) if on)
        self.sums = {n: 0.0 for n in self.variants}
        self.count = 0

    @property
    def need_sums(self) -> bool:
        """Whether the ranking pass must also sum the similarities at or above each positive (rank order)."""
        return MSD_NAMES[1] in self.variants

    @torch.no_grad()
    def observe(self, sim: torch.Tensor, pos_desc: torch.Tensor, pos_rank: torch.Tensor, valid: torch.Tensor,
                num_rel: torch.Tensor, ge_sum: Optional[torch.Tensor]) -> None:
        """One chunk of queries (any row order).

        Args:
            sim: [c, ng] raw similarities (cosines in [-1, 1]), storage order.
            pos_desc: [c, P] each query's positive similarities in descending order (padding where not ``valid``).
            pos_rank: [c, P] float64 1-based rank of the k-th positive (padding where not ``valid``).
            valid: [c, P] bool, slot k < num_rel.
            num_rel: [c] number of positives.
            ge_sum: [c, P] sum of ``sim`` over the items with ``sim >= pos_desc[:, k]`` (needed for rank order).
        """
        keep = num_rel > 0
        if not bool(keep.any()):
            return
        if not bool(keep.all()):
            sim, pos_desc, pos_rank, valid, num_rel = sim[keep], pos_desc[keep], pos_rank[keep], valid[keep], \
                num_rel[keep]
            ge_sum = ge_sum[keep] if ge_sum is not None else None
        ng = sim.shape[1]
        n = num_rel.to(torch.float64)  # [c]
        vmask = valid.to(torch.float64)  # [c, P]
        r0 = torch.where(valid, pos_rank - 1, torch.zeros_like(pos_rank)).long()  # [c, P] 0-based ranks
        blocks = block_sums(sim)  # [c, nb] float64
        total = blocks.sum(1) / 2 + 0.5 * ng  # [c] sum of s over the gallery
        if "mSD" in self.variants:  # storage order: the items stored at the positives' rank positions
            pos = (sim.gather(1, r0).to(torch.float64) / 2 + 0.5) * vmask  # [c, P]
            prefix = prefix_sums(sim, r0, blocks=blocks)  # [c, P] sum(sim[:, :r + 1])
            den = prefix / 2 + 0.5 * (r0 + 1).to(torch.float64)
            self._add("mSD", pos, den, total, n, vmask, ng)
        if "mSD_rank_order" in self.variants:  # rank order: the k-th best positive, the r_k + 1 highest s
            if ge_sum is None:
                raise ValueError("MSDAccumulator.observe: rank order needs ge_sum (the ranking pass's sums)")
            p = torch.where(valid, pos_desc.to(torch.float64), torch.zeros_like(pos_desc, dtype=torch.float64))
            # positives with sim >= p_k (equal later positives included, as in ge_sum): ranks are pessimistic, so
            # the top r_k items are the negatives >= p_k and positives 1..k
            ge_pos = ((p[:, None, :] >= p[:, :, None]) & valid[:, None, :]).to(torch.float64)  # [c, P(k), P(j)]
            pos_ge_sum = (ge_pos * p[:, None, :]).sum(-1)  # [c, P]
            top_sim = ge_sum.to(torch.float64) - pos_ge_sum + torch.cumsum(p, 1)  # [c, P] sum of sim of the top r_k
            den = top_sim / 2 + 0.5 * (r0 + 1).to(torch.float64)
            self._add("mSD_rank_order", (p / 2 + 0.5) * vmask, den, total, n, vmask, ng)
        self.count += int(n.numel())

    def _add(self, name: str, pos: torch.Tensor, den: torch.Tensor, total: torch.Tensor, n: torch.Tensor,
             vmask: torch.Tensor, ng: int) -> None:
        """pos [c, P] positive s per slot (0 where invalid), den [c, P] prefix sums of s at the slots' ranks."""
        pos_sum = pos.sum(1)  # [c]
        neg_sum = total - pos_sum
        n_neg = ng - n
        ratio = (pos_sum / n) / (neg_sum / n_neg)  # [c]
        pn = 1 - torch.exp(-ratio)
        sd = (torch.cumsum(pos, 1) / den * vmask).sum(1) / n * pn  # [c]
        self.sums[name] += float(sd.sum())

    def result(self) -> Dict[str, float]:
        """``{"mSD": ..., "mSD_rank_order": ...}`` (the variants asked for) in percent; NaN without any query."""
        return {k: (v / self.count * 100 if self.count else math.nan) for k, v in self.sums.items()}
