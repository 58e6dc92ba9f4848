"""Retrieval metrics (R@k / mAP / mINP) and the text-to-image Evaluator.

``rank`` returns the same numbers as the original IRRA ``rank`` (kept as ``rank_naive``) but never sorts the
full similarity matrix and never builds an ``[nq, ng]`` float/int matrix beyond one query chunk:

* CMC and the returned ``indices`` come from ``topk(max_rank)`` per chunk.
* AP / mINP only need the 1-based rank of every positive. With the positives of a query sorted by descending
  similarity ``p_1 >= p_2 >= ...``, the k-th positive's rank is ``k + #{negatives with sim >= p_k}``. Each
  negative's bucket ``b = #{positives with sim > v}`` comes from a batched ``searchsorted``; a per-(query, bucket)
  ``bincount`` followed by a cumulative sum gives ``#{negatives with sim >= p_k}`` for every k.

Ties: the original uses ``torch.argsort`` (unstable), so the order of equal similarities is unspecified there.
Here a negative whose similarity equals a positive's is counted *above* it (pessimistic), and equal positives
take consecutive ranks. With continuous similarities (real embeddings) ties have probability ~0 and both agree;
``indices`` order equal scores as ``torch.topk`` does.

Queries without any positive in the gallery: the original crashes (``row.nonzero()[-1]`` on an empty tensor,
and its AP would be 0/0 = nan). Here such queries count as misses in the CMC (as the original's CMC does) and are
left out of mAP / mINP (averaged over queries that have a positive; nan if none has). ``Evaluator`` logs a
warning with their number.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from prettytable import PrettyTable
from torch.utils.data import DataLoader, Subset

from utils import comm

logger = logging.getLogger("IRRA.eval")

DEFAULT_CHUNK_SIZE = 1024  # queries per chunk: memory ~ chunk_size * ng * 4 bytes per temporary
RANKS_REPORTED = (1, 5, 10)


def rank_naive(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = 10,
               get_mAP: bool = True):
    """The original IRRA ``rank`` (reference for tests and the benchmark; O(nq * ng) memory, full sort).

    Returns ``(all_cmc, mAP, mINP, indices)`` or ``(all_cmc, indices)``; ``indices`` is the full argsort [nq, ng].
    """
    if get_mAP:
        indices = torch.argsort(similarity, dim=1, descending=True)
    else:
        # acclerate sort with topk
        _, indices = torch.topk(similarity, k=max_rank, dim=1, largest=True, sorted=True)  # q * topk
    pred_labels = g_pids[indices.cpu()]  # q * k
    matches = pred_labels.eq(q_pids.view(-1, 1))  # q * k

    all_cmc = matches[:, :max_rank].cumsum(1)  # cumulative sum
    all_cmc[all_cmc > 1] = 1
    all_cmc = all_cmc.float().mean(0) * 100
    if not get_mAP:
        return all_cmc, indices

    num_rel = matches.sum(1)  # q
    tmp_cmc = matches.cumsum(1)  # q * k

    inp = [tmp_cmc[i][match_row.nonzero()[-1]] / (match_row.nonzero()[-1] + 1.0) for i, match_row in enumerate(matches)]
    mINP = torch.cat(inp).mean() * 100

    tmp_cmc = [tmp_cmc[:, i] / (i + 1.0) for i in range(tmp_cmc.shape[1])]
    tmp_cmc = torch.stack(tmp_cmc, 1) * matches
    AP = tmp_cmc.sum(1) / num_rel  # q
    mAP = AP.mean() * 100
    return all_cmc, mAP, mINP, indices


def _positive_index(q_pids: torch.Tensor, g_pids: torch.Tensor):
    """Where each query's positives sit in the gallery, without an [nq, ng] mask.

    Returns (order [ng]: gallery indices grouped by pid, start [nq]: first slot of the query's pid in ``order``,
    num_rel [nq]: number of gallery items with the query's pid).
    """
    order = torch.argsort(g_pids, stable=True)  # [ng]
    uniq, counts = torch.unique_consecutive(g_pids[order], return_counts=True)  # [u], [u]
    starts = counts.cumsum(0) - counts  # [u]
    slot = torch.searchsorted(uniq, q_pids).clamp(max=uniq.numel() - 1)  # [nq]
    present = uniq[slot] == q_pids
    num_rel = torch.where(present, counts[slot], torch.zeros_like(counts[slot]))  # [nq]
    return order, starts[slot], num_rel


def _rank_chunk(sim: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int, get_mAP: bool,
                pos_index=None):
    """Metrics of one chunk of queries.

    Args:
        sim: [c, ng] similarities (float, any device).
        q_pids: [c] query ids, g_pids: [ng] gallery ids (same device as ``sim``).
        pos_index: ``_positive_index`` of (q_pids, g_pids) (computed here when None).
    Returns:
        hits [k] (number of queries with a positive within the top-j, j = 1..k, k = min(max_rank, ng)),
        indices [c, k], and when get_mAP: AP [c] float64, INP [c] float64, has_pos [c] bool (else None x3).
    """
    k = min(max_rank, sim.shape[1])
    _, indices = torch.topk(sim, k=k, dim=1, largest=True, sorted=True)  # [c, k]
    top_matches = g_pids[indices] == q_pids[:, None]  # [c, k]
    hits = (top_matches.cumsum(1) > 0).sum(0)  # [k]
    if not get_mAP:
        return hits, indices, None, None, None

    c, ng = sim.shape
    dev = sim.device
    order, start, num_rel = pos_index if pos_index is not None else _positive_index(q_pids, g_pids)
    has_pos = num_rel > 0  # [c]
    pmax = int(num_rel.max()) if c > 0 else 0
    if pmax == 0:
        zeros = torch.zeros(c, dtype=torch.float64, device=dev)
        return hits, indices, zeros, zeros, has_pos
    slots = torch.arange(pmax, device=dev)  # [P]
    valid = slots[None, :] < num_rel[:, None]  # [c, P]
    pos_g = order[(start[:, None] + slots[None, :]).clamp(max=ng - 1)]  # [c, P] gallery index of each positive
    pos_sim = sim.gather(1, pos_g).masked_fill(~valid, float("-inf"))  # [c, P]
    pos_desc, _ = torch.sort(pos_sim, dim=1, descending=True)  # [c, P], -inf pads last
    pos_asc = pos_desc.flip(1).contiguous()  # [c, P] ascending, as searchsorted requires
    # bucket(v) = #positives with sim > v = P - #(entries <= v) (pads are -inf, always <= v); the histogram index
    # of gallery item v of row r is r * (P + 1) + bucket(v), computed in int32 (bincount is much faster on it)
    n_le = torch.searchsorted(pos_asc, sim.contiguous(), right=True, out_int32=True)  # [c, ng]
    nb = pmax + 1
    base = torch.arange(c, device=dev, dtype=torch.int32) * nb + pmax  # [c]
    flat = (base[:, None] - n_le).view(-1)  # [c * ng]
    del n_le
    hist = torch.bincount(flat, minlength=c * nb)  # [c * nb]
    del flat
    # remove the positives themselves: the k-th positive's bucket is the number of positives strictly above it
    pos_bucket = (pos_desc[:, None, :] > pos_desc[:, :, None]).sum(-1)  # [c, P]
    rows = torch.arange(c, device=dev)[:, None] * nb  # [c, 1]
    own = (rows + pos_bucket)[valid]  # [n_pos] histogram slots of the positives
    hist.scatter_add_(0, own, torch.full(own.shape, -1, dtype=hist.dtype, device=dev))
    neg_above = hist.view(c, nb)[:, :pmax].cumsum(1)  # [c, P]: negatives with sim >= p_k
    ks = torch.arange(1, pmax + 1, device=dev, dtype=torch.float64)  # [P]
    pos_rank = neg_above.to(torch.float64) + ks  # [c, P] 1-based rank of the k-th positive (ties: pessimistic)
    ap = ((ks / pos_rank) * valid).sum(1) / num_rel.to(torch.float64).clamp(min=1)  # [c]
    last = (num_rel - 1).clamp(min=0).to(torch.int64)[:, None]  # [c, 1]
    inp = num_rel.to(torch.float64) / pos_rank.gather(1, last).squeeze(1)  # [c]
    return hits, indices, ap, inp, has_pos


class _RankAccumulator:
    """Sums chunk results of ``_rank_chunk`` into (cmc, mAP, mINP, indices)."""

    def __init__(self, get_mAP: bool):
        self.get_mAP = get_mAP
        self.hits: Optional[torch.Tensor] = None
        self.indices: List[torch.Tensor] = []
        self.ap_sum = 0.0
        self.inp_sum = 0.0
        self.n_pos = 0
        self.n = 0
        self.n_no_pos = 0

    def add(self, hits, indices, ap, inp, has_pos) -> None:
        self.hits = hits if self.hits is None else self.hits + hits
        self.indices.append(indices)
        self.n += indices.shape[0]
        if self.get_mAP:
            self.ap_sum += float(ap[has_pos].sum())
            self.inp_sum += float(inp[has_pos].sum())
            n_pos = int(has_pos.sum())
            self.n_pos += n_pos
            self.n_no_pos += indices.shape[0] - n_pos

    def result(self):
        cmc = self.hits.to(torch.float64) / self.n * 100
        cmc = cmc.to(torch.float32)
        indices = torch.cat(self.indices, 0)
        if not self.get_mAP:
            return cmc, indices
        denom = self.n_pos if self.n_pos > 0 else float("nan")
        mAP = torch.tensor(self.ap_sum / denom * 100 if self.n_pos else float("nan"), dtype=torch.float32)
        mINP = torch.tensor(self.inp_sum / denom * 100 if self.n_pos else float("nan"), dtype=torch.float32)
        return cmc, mAP, mINP, indices


def rank(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = 10,
         get_mAP: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """CMC / mAP / mINP of a query x gallery similarity matrix, chunked over queries (see module docstring).

    Args:
        similarity: [nq, ng] scores, higher = more similar (computation stays on its device).
        q_pids: [nq] query identity ids; g_pids: [ng] gallery identity ids.
        max_rank: length of the CMC curve and of ``indices`` (capped at ng).
        get_mAP: also compute mAP and mINP.
        chunk_size: queries processed at once (bounds the temporary memory to O(chunk_size * ng)).
    Returns:
        ``(cmc [max_rank], mAP [], mINP [], indices [nq, max_rank])`` in percent (float32 tensors), ``indices`` the
        top-``max_rank`` gallery indices per query by descending similarity; ``(cmc, indices)`` when not get_mAP.
    """
    if similarity.dim() != 2 or similarity.shape != (q_pids.numel(), g_pids.numel()):
        raise ValueError(f"rank: similarity {tuple(similarity.shape)} must be [len(q_pids)={q_pids.numel()}, "
                         f"len(g_pids)={g_pids.numel()}]")
    if chunk_size < 1:
        raise ValueError(f"rank: chunk_size must be >= 1, got {chunk_size}")
    device = similarity.device
    q_pids = q_pids.to(device).view(-1)
    g_pids = g_pids.to(device).view(-1)
    order, start, num_rel = _positive_index(q_pids, g_pids)
    acc = _RankAccumulator(get_mAP)
    for s in range(0, similarity.shape[0], chunk_size):
        e = s + chunk_size
        acc.add(*_rank_chunk(similarity[s:e], q_pids[s:e], g_pids, max_rank, get_mAP, (order, start[s:e], num_rel[s:e])))
    return acc.result()


def rank_from_features(q_feats: torch.Tensor, g_feats: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor,
                       max_rank: int = 10, get_mAP: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """``rank(q_feats @ g_feats.T, ...)`` without materialising the similarity matrix (one chunk at a time).

    Args:
        q_feats: [nq, D] query features; g_feats: [ng, D] gallery features (same device; not normalised here).
    """
    if chunk_size < 1:
        raise ValueError(f"rank_from_features: chunk_size must be >= 1, got {chunk_size}")
    device = q_feats.device
    q_pids = q_pids.to(device).view(-1)
    g_pids = g_pids.to(device).view(-1)
    g_t = g_feats.t()  # [D, ng]
    order, start, num_rel = _positive_index(q_pids, g_pids)
    acc = _RankAccumulator(get_mAP)
    for s in range(0, q_feats.shape[0], chunk_size):
        e = s + chunk_size
        sim = q_feats[s:e] @ g_t  # [c, ng]
        acc.add(*_rank_chunk(sim, q_pids[s:e], g_pids, max_rank, get_mAP, (order, start[s:e], num_rel[s:e])))
        del sim
    return acc.result()


def _shard_loader(loader: DataLoader, rank_: int, world: int) -> DataLoader:
    """A loader over this rank's contiguous shard of ``loader.dataset`` (same batch size / workers / collate)."""
    n = len(loader.dataset)
    per = (n + world - 1) // world
    start, end = min(rank_ * per, n), min((rank_ + 1) * per, n)
    return DataLoader(Subset(loader.dataset, range(start, end)), batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


class Evaluator:
    """Text-to-image retrieval evaluation (as the original ``utils/metrics.py:Evaluator``).

    Args:
        img_loader: gallery loader yielding ``(pid, img)`` batches (``ImageDataset``).
        txt_loader: query loader yielding ``(pid, caption_ids)`` batches (``TextDataset``).
        chunk_size: queries per similarity chunk.

    Distributed (torch.distributed initialised, world size > 1): each rank encodes a contiguous shard of both
    datasets, features are gathered in rank order, rank 0 computes the metrics and broadcasts the result dict, so
    every rank returns the same dict (and all ranks must call ``eval``).
    """

    def __init__(self, img_loader: DataLoader, txt_loader: DataLoader, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.img_loader = img_loader  # gallery
        self.txt_loader = txt_loader  # query
        self.chunk_size = chunk_size
        self.logger = logger

    @torch.no_grad()
    def _compute_embedding(self, model: torch.nn.Module):
        """Returns (qfeats [nq, D], gfeats [ng, D], qids [nq], gids [ng]) on the model's device, in dataset order."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        model.eval()
        device = next(model.parameters()).device
        world, rank_ = comm.get_world_size(), comm.get_rank()
        txt_loader, img_loader = self.txt_loader, self.img_loader
        if world > 1:
            txt_loader = _shard_loader(txt_loader, rank_, world)
            img_loader = _shard_loader(img_loader, rank_, world)

        qids, gids, qfeats, gfeats = [], [], [], []
        for pid, caption in txt_loader:  # text
            caption = caption.to(device)
            qfeats.append(model.encode_text(caption).float())
            qids.append(pid.view(-1))
        for pid, img in img_loader:  # image
            img = img.to(device)
            gfeats.append(model.encode_image(img).float())
            gids.append(pid.view(-1))
        qfeats = _cat(qfeats, device)
        gfeats = _cat(gfeats, device)
        qids = _cat(qids, device, dtype=torch.long)
        gids = _cat(gids, device, dtype=torch.long)
        if world > 1:
            qfeats, gfeats, qids, gids = (_gather_cat(t) for t in (qfeats, gfeats, qids, gids))
        return qfeats, gfeats, qids, gids

    def eval(self, model: torch.nn.Module, i2t_metric: bool = False) -> Dict[str, float]:
        """Encode, rank and log; returns {"R1","R5","R10","mAP","mINP"} for t2i (+ "i2t_R1".. if i2t_metric)."""
        was_training = model.training
        try:
            qfeats, gfeats, qids, gids = self._compute_embedding(model)
        finally:
            model.train(was_training)
        result: Optional[Dict[str, float]] = None
        if comm.get_rank() == 0:
            result = self._metrics(qfeats, gfeats, qids, gids, i2t_metric)
        if comm.get_world_size() > 1:
            result = comm.broadcast_object(result, src=0)
        return result

    def _metrics(self, qfeats, gfeats, qids, gids, i2t_metric: bool) -> Dict[str, float]:
        qfeats = F.normalize(qfeats, p=2, dim=1)  # text features
        gfeats = F.normalize(gfeats, p=2, dim=1)  # image features
        n_no_pos = int((~torch.isin(qids, gids)).sum())
        if n_no_pos:
            self.logger.warning("%d of %d text queries have no image of their identity in the gallery: they count "
                                "as misses in R@k and are left out of mAP/mINP", n_no_pos, qids.numel())
        cmc, mAP, mINP, _ = rank_from_features(qfeats, gfeats, qids, gids, max_rank=10, get_mAP=True,
                                               chunk_size=self.chunk_size)
        table = PrettyTable(["task", "R1", "R5", "R10", "mAP", "mINP"])
        out = _as_dict(cmc, mAP, mINP, "")
        table.add_row(["t2i", out["R1"], out["R5"], out["R10"], out["mAP"], out["mINP"]])
        if i2t_metric:
            cmc, mAP, mINP, _ = rank_from_features(gfeats, qfeats, gids, qids, max_rank=10, get_mAP=True,
                                                   chunk_size=self.chunk_size)
            i2t = _as_dict(cmc, mAP, mINP, "i2t_")
            table.add_row(["i2t", i2t["i2t_R1"], i2t["i2t_R5"], i2t["i2t_R10"], i2t["i2t_mAP"], i2t["i2t_mINP"]])
            out.update(i2t)
        for col in ("R1", "R5", "R10", "mAP", "mINP"):
            table.custom_format[col] = lambda f, v: f"{v:.3f}"
        self.logger.info("\n" + str(table))
        return out


def _cat(parts: List[torch.Tensor], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if not parts:  # an empty shard
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat(parts, 0).to(device)


def _gather_cat(t: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated in rank order (shards may differ in length or be empty)."""
    parts = [p for p in comm.all_gather(t.detach().cpu()) if p.numel() > 0]
    return torch.cat(parts, 0).to(t.device) if parts else t


def _as_dict(cmc: torch.Tensor, mAP: torch.Tensor, mINP: torch.Tensor, prefix: str) -> Dict[str, float]:
    out = {f"{prefix}R{k}": float(cmc[min(k, cmc.numel()) - 1]) for k in RANKS_REPORTED}
    out[f"{prefix}mAP"] = float(mAP)
    out[f"{prefix}mINP"] = float(mINP)
    return out
