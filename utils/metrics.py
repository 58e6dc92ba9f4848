"""Retrieval metrics (R@k / mAP / mINP) and the text-to-image Evaluator.

``rank`` returns the same numbers as the original IRRA ``rank`` (kept as ``rank_naive`` in benchmarks/reference.py,
the reference of the tests and the benchmark) but never sorts the similarity matrix, has no Python loop over queries,
and works on query chunks (memory O(chunk_size * ng)):

* All metrics only need the 1-based rank of every positive. With a query's positives sorted by descending
  similarity ``p_1 >= p_2 >= ...`` (found through a pid index of the gallery, no [nq, ng] mask), the k-th
  positive's rank is ``k + #{negatives with sim >= p_k}`` and ``#{items >= p_k}`` is one compare-and-count pass
  over the chunk. Queries are processed in order of decreasing number of positives, so the pass for the k-th
  positive only touches the prefix of the chunk whose queries have more than k positives: the total work is
  (number of positive pairs) x ng compares, done with numpy's vectorised ``count_nonzero`` on CPU and torch on
  other devices. R@k: hit iff the first positive's rank <= k. AP = mean_k k / rank_k, INP = n_pos / rank_last.
* ``indices`` (top-``max_rank`` gallery items per query) come from ``torch.topk`` per chunk (skipped by the
  Evaluator, which does not need them).

Ties: the original uses ``torch.argsort`` (unstable), so the order of equal similarities is unspecified there.
Here a negative whose similarity equals a positive's is counted *above* it (pessimistic), and equal positives
take consecutive ranks. With continuous similarities (real embeddings) ties are rare and both agree; ``indices``
order equal scores as ``torch.topk`` does (may differ from ``argsort`` only in the order of equal scores).

Queries without any positive in the gallery: the original crashes (``row.nonzero()[-1]`` on an empty tensor,
and its AP would be 0/0 = nan). Here such queries count as misses in the CMC (as the original's CMC does) and are
left out of mAP / mINP (averaged over queries that have a positive; nan if none has). ``Evaluator`` logs a
warning with their number.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from prettytable import PrettyTable
from torch.utils.data import DataLoader, Subset

from utils import comm
from utils.msd import MSD_NAMES, MSDAccumulator

logger = logging.getLogger("IRRA.eval")

DEFAULT_CHUNK_SIZE = 1024  # queries per chunk: memory ~ chunk_size * ng * 4 bytes per temporary
RANKS_REPORTED = (1, 5, 10)
NUMPY_COUNT_ON_CPU = True  # count with numpy on CPU tensors (faster); False = torch everywhere (tests use both)


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise FloatingPointError when rows of ``values`` ([N, ...]) hold NaN/inf, naming ``what`` and how many rows.

    A NaN compares False with everything, so it would otherwise rank as a perfect retrieval."""
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1) if values.numel() else values.new_zeros(0)
    n_bad = int(bad.sum())
    if n_bad:
        raise FloatingPointError(f"{what}: {n_bad} of {values.shape[0]} rows hold NaN/inf values (first row "
                                 f"{int(bad.nonzero()[0])}); the model has diverged, metrics would be meaningless")


def _check_finite_chunk(chunk: torch.Tensor, n_rows: int, what: str, first_row: int = 0,
                        rows: Optional[torch.Tensor] = None) -> None:
    """:func:`check_finite` of one chunk of rows of an ``[n_rows, ...]`` matrix (``rows``: their indices in it,
    else ``first_row`` onwards); the error names the first bad row of the chunk in the whole matrix. The memory of
    the check is that of a chunk, not of the matrix."""
    if chunk.numel() == 0:
        return
    # A finite sum means every value is finite (a NaN or an inf makes it NaN / inf); one reduction, 15x cheaper than
    # isfinite().all(). Only a non-finite sum (a bad value, or an overflow of huge values) takes the exact look.
    total = chunk.sum(dtype=torch.float64 if chunk.dtype == torch.float64 else torch.float32)
    if bool(torch.isfinite(total)) or bool(torch.isfinite(chunk).all()):
        return
    bad = ~torch.isfinite(chunk).all(dim=1)  # [c]
    first = int(bad.nonzero()[0])
    row = int(rows[first]) if rows is not None else first_row + first
    raise FloatingPointError(f"{what}: {int(bad.sum())} of {chunk.shape[0]} rows of a chunk hold NaN/inf values "
                             f"(first row {row} of {n_rows}); the model has diverged, metrics would be meaningless")


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


def _count_ge(sim: torch.Tensor, thr: torch.Tensor, workspace: Optional[dict] = None, with_sum: bool = False):
    """Per row, the number of entries >= the row's threshold: sim [n, ng], thr [n] -> [n] int64; with ``with_sum``
    also the sum of those entries ([n] float64, mSD's rank-order variant): ``(count, sum)``.

    ``workspace``: a dict reused across calls to keep the boolean scratch buffer (fresh allocations page-fault).
    """
    if sim.device.type == "cpu" and NUMPY_COUNT_ON_CPU:  # numpy's compare + count_nonzero beats torch's on CPU
        a = sim.numpy() if sim.dtype in (torch.float32, torch.float64, torch.float16) else sim.float().numpy()
        t = thr.to(sim.dtype if sim.dtype != torch.bfloat16 else torch.float32).numpy()
        ws = workspace if workspace is not None else {}
        buf = ws.get("ge")
        if buf is None or buf.size < a.size:
            buf = ws["ge"] = np.empty(a.size, dtype=bool)
        ge = np.greater_equal(a, t[:, None], out=buf[:a.size].reshape(a.shape))  # [n, ng]
        count = torch.from_numpy(np.count_nonzero(ge, axis=1).astype(np.int64))
        if with_sum:  # einsum of the values and the mask: one pass, no float copy of the mask
            return count, torch.from_numpy(np.einsum("ij,ij->i", a, ge).astype(np.float64))
        return count
    ge = sim >= thr[:, None]  # [n, ng]
    if with_sum:
        return ge.sum(1), torch.where(ge, sim, torch.zeros_like(sim)).sum(1, dtype=torch.float64)
    return ge.sum(1)  # [n]


def _rank_chunk(sim: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int, get_mAP: bool,
                pos_index=None, need_indices: bool = True, workspace: Optional[dict] = None,
                observer: Optional[MSDAccumulator] = None):
    """Metrics of one chunk of queries.

    Args:
        sim: [c, ng] similarities (float, any device).
        q_pids: [c] query ids, g_pids: [ng] gallery ids (same device as ``sim``).
        pos_index: ``_positive_index`` of (q_pids, g_pids) restricted to the chunk (computed here when None).
        need_indices: also return the top-k gallery indices (else None).
        workspace: scratch buffers reused across chunks (optional).
        observer: an ``MSDAccumulator`` (utils/msd.py) given the positives' ranks of the chunk.
    Returns:
        hits [k] (number of queries with a positive within the top-j, j = 1..k, k = min(max_rank, ng)),
        indices [c, k] or None, and when get_mAP: AP [c] float64, INP [c] float64, has_pos [c] bool (else None x3).
    """
    c, ng = sim.shape
    k = min(max_rank, ng)
    dev = sim.device
    indices = None
    if need_indices or not get_mAP:
        _, indices = torch.topk(sim, k=k, dim=1, largest=True, sorted=True)  # [c, k]
    if not get_mAP:
        top_matches = g_pids[indices] == q_pids[:, None]  # [c, k]
        return (top_matches.cumsum(1) > 0).sum(0), indices, None, None, None

    order, start, num_rel = pos_index if pos_index is not None else _positive_index(q_pids, g_pids)
    has_pos = num_rel > 0  # [c]
    pmax = int(num_rel.max()) if c > 0 else 0
    if pmax == 0:
        zeros = torch.zeros(c, dtype=torch.float64, device=dev)
        return torch.zeros(k, dtype=torch.int64, device=dev), indices, zeros, zeros, has_pos
    # rows by decreasing number of positives, so the rows having a k-th positive are a prefix
    perm = torch.argsort(num_rel, descending=True, stable=True)  # [c]
    sorted_already = bool((perm == torch.arange(c, device=dev)).all())
    if not sorted_already:
        sim, start, num_rel = sim[perm], start[perm], num_rel[perm]
    sim = sim.detach().contiguous()
    slots = torch.arange(pmax, device=dev)  # [P]
    valid = slots[None, :] < num_rel[:, None]  # [c, P]
    pos_g = order[(start[:, None] + slots[None, :]).clamp(max=ng - 1)]  # [c, P] gallery index of each positive
    pos_sim = sim.gather(1, pos_g).masked_fill(~valid, float("-inf"))  # [c, P]
    pos_desc, _ = torch.sort(pos_sim, dim=1, descending=True)  # [c, P], -inf pads last
    n_rows = (num_rel[None, :] > slots[:, None]).sum(1).tolist()  # [P]: rows having a (k+1)-th positive
    ge = torch.zeros(c, pmax, dtype=torch.int64, device=dev)  # [c, P] items with sim >= p_k
    with_sum = observer is not None and observer.need_sums
    ge_sum = torch.zeros(c, pmax, dtype=torch.float64, device=dev) if with_sum else None  # [c, P] their sum
    for j, n in enumerate(n_rows):  # loop over positive slots (<= max positives per id), not over queries
        if with_sum:
            cnt, tot = _count_ge(sim[:n], pos_desc[:n, j].contiguous(), workspace, with_sum=True)
            ge[:n, j], ge_sum[:n, j] = cnt.to(dev), tot.to(dev)
        else:
            ge[:n, j] = _count_ge(sim[:n], pos_desc[:n, j].contiguous(), workspace).to(dev)
    pos_ge = (pos_desc[:, None, :] >= pos_desc[:, :, None]).sum(-1)  # [c, P] positives with sim >= p_k
    ks = torch.arange(1, pmax + 1, device=dev, dtype=torch.float64)  # [P]
    pos_rank = (ge - pos_ge).to(torch.float64) + ks  # [c, P] 1-based rank of the k-th positive (ties: pessimistic)
    first = torch.where(num_rel > 0, pos_rank[:, 0], torch.full_like(pos_rank[:, 0], float("inf")))  # [c]
    hits = (first[:, None] <= torch.arange(1, k + 1, device=dev, dtype=torch.float64)[None, :]).sum(0)  # [k]
    if observer is not None:  # mSD (row order does not matter: a mean over queries)
        observer.observe(sim, pos_desc, pos_rank, valid, num_rel, ge_sum)
    pos_rank = torch.where(valid, pos_rank, torch.full_like(pos_rank, float("inf")))  # slots without a positive
    ap = (ks / pos_rank).sum(1) / num_rel.to(torch.float64).clamp(min=1)  # [c]
    last = (num_rel - 1).clamp(min=0).to(torch.int64)[:, None]  # [c, 1]
    inp = num_rel.to(torch.float64) / pos_rank.gather(1, last).squeeze(1)  # [c]
    if not sorted_already:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(c, device=dev)
        ap, inp = ap[inv], inp[inv]
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

    def add(self, hits, indices, ap, inp, has_pos) -> None:
        self.hits = hits if self.hits is None else self.hits + hits
        if indices is not None:
            self.indices.append(indices)
        self.n += has_pos.numel() if has_pos is not None else indices.shape[0]
        if self.get_mAP:
            self.ap_sum += float(ap[has_pos].sum())
            self.inp_sum += float(inp[has_pos].sum())
            self.n_pos += int(has_pos.sum())

    def result(self):
        cmc = (self.hits.to(torch.float64) / self.n * 100).to(torch.float32)
        indices = torch.cat(self.indices, 0) if self.indices else None
        if not self.get_mAP:
            return cmc, indices
        nan = float("nan")
        mAP = torch.tensor(self.ap_sum / self.n_pos * 100 if self.n_pos else nan, dtype=torch.float32)
        mINP = torch.tensor(self.inp_sum / self.n_pos * 100 if self.n_pos else nan, dtype=torch.float32)
        return cmc, mAP, mINP, indices


def _query_order(q_pids: torch.Tensor, g_pids: torch.Tensor):
    """Positive index and the query order (decreasing number of positives) used to form chunks."""
    order, start, num_rel = _positive_index(q_pids, g_pids)
    qorder = torch.argsort(num_rel, descending=True, stable=True)  # [nq]
    return order, start, num_rel, qorder


def _unpermute(indices: Optional[torch.Tensor], qorder: torch.Tensor) -> Optional[torch.Tensor]:
    if indices is None:
        return None
    out = torch.empty_like(indices)
    out[qorder] = indices  # row i of ``indices`` belongs to query qorder[i]
    return out


def rank(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = 10,
         get_mAP: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE, need_indices: bool = True,
         observer: Optional[MSDAccumulator] = None):
    """CMC / mAP / mINP of a query x gallery similarity matrix, chunked over queries (see module docstring).

    Args:
        similarity: [nq, ng] scores, higher = more similar (computation stays on its device).
        q_pids: [nq] query identity ids; g_pids: [ng] gallery identity ids.
        max_rank: length of the CMC curve and of ``indices`` (capped at ng).
        get_mAP: also compute mAP and mINP.
        chunk_size: queries processed at once (bounds the temporary memory to O(chunk_size * ng)).
        need_indices: with get_mAP, False skips the top-k search (``indices`` is then None; the metrics need
            only the ranks of the positives, so this is the faster path the Evaluator takes).
        observer: with get_mAP, an ``MSDAccumulator`` fed every chunk (mSD, utils/msd.py).
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
    acc = _RankAccumulator(get_mAP)
    what = "rank: the similarity matrix"
    if not get_mAP:
        for s in range(0, similarity.shape[0], chunk_size):
            _check_finite_chunk(similarity[s:s + chunk_size], similarity.shape[0], what, first_row=s)
            acc.add(*_rank_chunk(similarity[s:s + chunk_size], q_pids[s:s + chunk_size], g_pids, max_rank, False))
        return acc.result()
    order, start, num_rel, qorder = _query_order(q_pids, g_pids)
    workspace: dict = {}
    buf = similarity.new_empty(min(chunk_size, similarity.shape[0]), similarity.shape[1])  # reused chunk buffer
    for s in range(0, similarity.shape[0], chunk_size):
        rows = qorder[s:s + chunk_size]  # [c]
        sim = torch.index_select(similarity.detach(), 0, rows, out=buf[:rows.numel()])  # [c, ng]
        _check_finite_chunk(sim, similarity.shape[0], what, rows=rows)  # per chunk: no [nq, ng] temporary
        acc.add(*_rank_chunk(sim, q_pids[rows], g_pids, max_rank, True, (order, start[rows], num_rel[rows]),
                             need_indices=need_indices, workspace=workspace, observer=observer))
    cmc, mAP, mINP, indices = acc.result()
    return cmc, mAP, mINP, _unpermute(indices, qorder)


def rank_from_features(q_feats: torch.Tensor, g_feats: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor,
                       max_rank: int = 10, chunk_size: int = DEFAULT_CHUNK_SIZE, need_indices: bool = True,
                       observer: Optional[MSDAccumulator] = None):
    """``rank(q_feats @ g_feats.T, ...)`` (get_mAP=True) without materialising the similarity matrix.

    Args:
        q_feats: [nq, D] query features; g_feats: [ng, D] gallery features (same device; not normalised here).
        need_indices: compute the top-``max_rank`` indices (else the 4th returned value is None; faster).
    """
    if chunk_size < 1:
        raise ValueError(f"rank_from_features: chunk_size must be >= 1, got {chunk_size}")
    check_finite(q_feats, "rank_from_features: the query features")
    check_finite(g_feats, "rank_from_features: the gallery features")
    device = q_feats.device
    q_pids = q_pids.to(device).view(-1)
    g_pids = g_pids.to(device).view(-1)
    order, start, num_rel, qorder = _query_order(q_pids, g_pids)
    q_feats, g_t = q_feats.detach(), g_feats.detach().t()  # [nq, D], [D, ng]
    acc = _RankAccumulator(True)
    workspace: dict = {}
    dtype = torch.promote_types(q_feats.dtype, g_feats.dtype)
    buf = torch.empty(min(chunk_size, q_feats.shape[0]), g_feats.shape[0], dtype=dtype, device=device)
    for s in range(0, q_feats.shape[0], chunk_size):
        rows = qorder[s:s + chunk_size]  # [c]
        sim = torch.matmul(q_feats[rows].to(dtype), g_t.to(dtype), out=buf[:rows.numel()])  # [c, ng]
        acc.add(*_rank_chunk(sim, q_pids[rows], g_pids, max_rank, True, (order, start[rows], num_rel[rows]),
                             need_indices, workspace, observer))
    cmc, mAP, mINP, indices = acc.result()
    return cmc, mAP, mINP, _unpermute(indices, qorder)


def mSD_rank(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = 10,
             rank_order: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """UFineBench's ``mSD_rank`` (utils/msd.py): ``(cmc [max_rank], mSD [], mAP [])`` in percent, float32 tensors.

    ``rank_order=False``: the published value (depends on the gallery's storage order); True: the order-consistent
    variant. Chunked over queries as :func:`rank` (the same pass gives the CMC and mAP)."""
    acc = MSDAccumulator(faithful=not rank_order, rank_order=rank_order)
    cmc, mAP, _, _ = rank(similarity, q_pids, g_pids, max_rank, True, chunk_size, need_indices=False, observer=acc)
    return cmc, torch.tensor(acc.result()[MSD_NAMES[int(rank_order)]], dtype=torch.float32), mAP


def _shard_loader(loader: DataLoader, rank_: int, world: int) -> DataLoader:
    """A loader over this rank's contiguous shard of ``loader.dataset`` (same batch size / workers / collate)."""
    n = len(loader.dataset)
    per = (n + world - 1) // world
    start, end = min(rank_ * per, n), min((rank_ + 1) * per, n)
    return DataLoader(Subset(loader.dataset, range(start, end)), batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


class _PlainFeatures:
    """The feature set of a model with ``encode_image`` / ``encode_text`` (the original Evaluator's; any method's
    ``Method`` object gives the same interface with its own sets)."""

    feature_sets = ("global",)
    default_feature_set = "global"

    @staticmethod
    def encode_images(model, images):
        return {"global": model.encode_image(images).float()}

    @staticmethod
    def encode_texts(model, text):
        return {"global": model.encode_text(text).float()}


class Evaluator:
    """Text-to-image retrieval evaluation (as the original ``utils/metrics.py:Evaluator``).

    Args:
        img_loader: gallery loader yielding ``(pid, img)`` batches (``ImageDataset``).
        txt_loader: query loader yielding ``(pid, caption_ids)`` batches (``TextDataset``).
        chunk_size: queries per similarity chunk.
        split: the split's name in messages (e.g. ``val`` / ``test``); features with NaN/inf raise a
            FloatingPointError naming it and the number of rows affected.
        method: what encodes (a ``methods.base.Method``: ``encode_images`` / ``encode_texts`` give named feature
            sets, ``feature_sets`` their order, ``default_feature_set`` the one reported as "R1", "mAP", ...; every
            other set is reported too, prefixed with its name: "tse_R1", ...). Default: the model's own
            ``encode_image`` / ``encode_text``, one set.
        metrics: extra metrics (``--metrics``, utils/choices.py:EXTRA_METRICS): "mSD" adds t2i ``mSD`` and
            ``mSD_rank_order`` (utils/msd.py), computed in the same ranking pass.

    Distributed (torch.distributed initialised, world size > 1): each rank encodes a contiguous shard of both
    datasets, features are gathered in rank order, rank 0 computes the metrics and broadcasts the result dict, so
    every rank returns the same dict (and all ranks must call ``eval``).
    """

    def __init__(self, img_loader: DataLoader, txt_loader: DataLoader, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 split: str = "evaluation", method=None, metrics: Sequence[str] = ()):
        self.img_loader = img_loader  # gallery
        self.txt_loader = txt_loader  # query
        self.chunk_size = chunk_size
        self.split = split
        self.method = method if method is not None else _PlainFeatures()
        self.metrics = tuple(metrics)
        self.logger = logger

    @torch.no_grad()
    def _compute_embedding(self, model: torch.nn.Module):
        """Returns ({set: qfeats [nq, D]}, {set: gfeats [ng, D]}, qids [nq], gids [ng]) on the model's device, in
        dataset order."""
        model = comm.unwrap_model(model)
        model.eval()
        device = next(model.parameters()).device
        world, rank_ = comm.get_world_size(), comm.get_rank()
        txt_loader, img_loader = self.txt_loader, self.img_loader
        if world > 1:
            txt_loader = _shard_loader(txt_loader, rank_, world)
            img_loader = _shard_loader(img_loader, rank_, world)

        names = self.method.feature_sets
        qids, gids = [], []
        qfeats: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        gfeats: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        for pid, caption in txt_loader:  # text
            feats = self.method.encode_texts(model, caption.to(device))
            for n in names:
                qfeats[n].append(feats[n].float())
            qids.append(pid.view(-1))
        for pid, img in img_loader:  # image
            feats = self.method.encode_images(model, img.to(device))
            for n in names:
                gfeats[n].append(feats[n].float())
            gids.append(pid.view(-1))
        qfeats = {n: _cat(v, device) for n, v in qfeats.items()}
        gfeats = {n: _cat(v, device) for n, v in gfeats.items()}
        qids = _cat(qids, device, dtype=torch.long)
        gids = _cat(gids, device, dtype=torch.long)
        if world > 1:
            qfeats = {n: _gather_cat(v) for n, v in qfeats.items()}
            gfeats = {n: _gather_cat(v) for n, v in gfeats.items()}
            qids, gids = _gather_cat(qids), _gather_cat(gids)
        return qfeats, gfeats, qids, gids

    def eval(self, model: torch.nn.Module, i2t_metric: bool = False) -> Dict[str, float]:
        """Encode, rank and log; returns {"R1","R5","R10","mAP","mINP"} for t2i (+ "i2t_R1".. if i2t_metric) of the
        method's default feature set, and the same prefixed with the set's name ("tse_R1", ...) for its other sets."""
        was_training = model.training
        try:
            qfeats, gfeats, qids, gids = self._compute_embedding(model)
        finally:
            model.train(was_training)
        result: object = None
        if comm.get_rank() == 0:
            try:
                result = self._all_metrics(qfeats, gfeats, qids, gids, i2t_metric)
            except FloatingPointError as e:  # shared with every rank below, so that all of them stop
                result = e
        if comm.get_world_size() > 1:
            result = comm.broadcast_object(result, src=0)
        if isinstance(result, FloatingPointError):
            raise result
        return result

    def _all_metrics(self, qfeats, gfeats, qids, gids, i2t_metric: bool) -> Dict[str, float]:
        """The metrics of every feature set, in ``feature_sets`` order (the default set's keys unprefixed)."""
        names, default = self.method.feature_sets, self.method.default_feature_set
        out: Dict[str, float] = {}
        for name in names:
            if len(names) > 1:
                self.logger.info("feature set %s%s:", name, " (the default)" if name == default else "")
            prefix = "" if name == default else name + "_"
            out.update({prefix + k: v for k, v in self._metrics(qfeats[name], gfeats[name], qids, gids,
                                                                 i2t_metric).items()})
        return out

    def _metrics(self, qfeats, gfeats, qids, gids, i2t_metric: bool) -> Dict[str, float]:
        check_finite(qfeats, f"{self.split} split: text query features")
        check_finite(gfeats, f"{self.split} split: image gallery features")
        qfeats = F.normalize(qfeats, p=2, dim=1)  # text features
        gfeats = F.normalize(gfeats, p=2, dim=1)  # image features
        n_no_pos = int((~torch.isin(qids, gids)).sum())
        if n_no_pos:
            self.logger.warning("%d of %d text queries have no image of their identity in the gallery: they count "
                                "as misses in R@k and are left out of mAP/mINP", n_no_pos, qids.numel())
        msd = MSDAccumulator() if "mSD" in self.metrics else None
        cmc, mAP, mINP, _ = rank_from_features(qfeats, gfeats, qids, gids, max_rank=10,
                                               chunk_size=self.chunk_size, need_indices=False, observer=msd)
        extra = msd.result() if msd is not None else {}
        table = PrettyTable(["task", "R1", "R5", "R10", "mAP", "mINP", *extra])
        out = {**_as_dict(cmc, mAP, mINP, ""), **extra}
        table.add_row(["t2i", out["R1"], out["R5"], out["R10"], out["mAP"], out["mINP"], *extra.values()])
        if i2t_metric:
            cmc, mAP, mINP, _ = rank_from_features(gfeats, qfeats, gids, qids, max_rank=10,
                                                   chunk_size=self.chunk_size, need_indices=False)
            i2t = _as_dict(cmc, mAP, mINP, "i2t_")
            table.add_row(["i2t", i2t["i2t_R1"], i2t["i2t_R5"], i2t["i2t_R10"], i2t["i2t_mAP"], i2t["i2t_mINP"],
                           *(["-"] * len(extra))])
            out.update(i2t)
        for col in ("R1", "R5", "R10", "mAP", "mINP", *extra):
            table.custom_format[col] = lambda f, v: f"{v:.3f}" if isinstance(v, float) else str(v)
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
