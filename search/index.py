"""Top-k of a gallery of embeddings: the one ranking path of ``Retriever.search`` (so of the search page,
``visualize.py --gallery`` and the test-split ranking).

Two indexes, chosen by :func:`build_index`:

- :class:`ExactIndex` (the default below ``threshold`` images): fp32 ``q @ g.T`` then ``topk``; when the [Q, N] score
  matrix would be large, the gallery is taken in blocks and the top-k of each block merged (same results).
- :class:`Int8Index` (``auto`` at or above ``threshold`` images, or asked for): a scan of int8 codes of the gallery
  (per-row symmetric scale, a quarter of the memory the fp32 product reads: the product is memory-bound on a CPU)
  picks ``max(k * rerank_factor, min_candidates)`` candidates, which are then re-scored exactly in fp32 from the
  embeddings. Scores returned are exact fp32 cosines; an image of the exact top-k is missed only when the int8 scan
  ranks it below every candidate, i.e. when its exact score lies within the quantisation error (on random unit
  vectors of 512 dims: mean 7e-4, at most 5e-3, for scores spread by 0.044) of the candidates' - :func:`recall_at_k`
  against :class:`ExactIndex` measures it
  (``benchmarks/bench_search_page.py --gallery_size 1000000`` prints it).

The int8 scan uses PyTorch's fbgemm kernel (``quantized::linear_dynamic``, x86 CPUs) and otherwise
``aten._weight_int8pack_mm`` (bf16 activations); both read the same codes.
"""
from __future__ import annotations

import logging
import time
import warnings

import torch

logger = logging.getLogger("IRRA.retrieval")

SEARCH_INDEXES = ("auto", "exact", "int8")
DEFAULT_SEARCH_INDEX = "auto"
# Galleries of at least this many images are searched through Int8Index with search_index="auto"; below, exactly.
# At 100,000 x 512 the exact product takes about 20 ms on one core.
DEFAULT_INDEX_THRESHOLD = 100_000
RERANK_FACTOR = 10        # Int8Index: candidates re-scored exactly = max(k * RERANK_FACTOR, MIN_CANDIDATES)
MIN_CANDIDATES = 100
INT8_BLOCK_ROWS = 65536   # Int8Index: gallery rows quantised / packed / scanned at once
EXACT_BLOCK_ELEMS = 1 << 26  # ExactIndex: largest [Q, N] score block computed at once (256 MB of fp32)
QUERY_CHUNK = 16          # Int8Index: queries scanned at once (bounds the [Q, N] approximate scores)


def _check(q: torch.Tensor, emb: torch.Tensor, k: int) -> None:
    if q.ndim != 2 or q.shape[1] != emb.shape[1]:
        raise ValueError(f"queries must be [Q, {emb.shape[1]}] (the gallery's width), got {tuple(q.shape)}")
    if not 1 <= k <= emb.shape[0]:
        raise ValueError(f"k must be in 1..{emb.shape[0]} (the gallery size), got {k}")


def _merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor, idx: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the union of the running best ([Q, k] scores and indices) and a block's ([Q, b])."""
    if best is not None:
        scores, idx = torch.cat([best[0], scores], dim=1), torch.cat([best[1], idx], dim=1)  # [Q, k + b]
    top, pos = scores.topk(min(k, scores.shape[1]), dim=1)
    return top, idx.gather(1, pos)


class ExactIndex:
    """Exact fp32 top-k over ``embeddings`` [N, D] (kept by reference, not copied)."""

    kind = "exact"

    def __init__(self, embeddings: torch.Tensor, block_elems: int = EXACT_BLOCK_ELEMS):
        self.embeddings = embeddings
        self.block_elems = block_elems

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q [Q, D] float32 -> (scores [Q, k], indices [Q, k]) by descending score."""
        g = self.embeddings
        _check(q, g, k)
        n = g.shape[0]
        rows = max(k, self.block_elems // max(q.shape[0], 1))
        if rows >= n:
            return (q @ g.float().T).topk(k, dim=1)  # [Q, N] -> [Q, k]
        best = None
        for s in range(0, n, rows):
            sc, ix = (q @ g[s:s + rows].float().T).topk(min(k, g[s:s + rows].shape[0]), dim=1)  # [Q, b] -> [Q, k']
            best = _merge_topk(best, sc, ix + s, k)
        return best


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class Int8Index:
    """Int8 scan for candidates, exact fp32 re-scoring of them (see the module docstring).

    Args:
        embeddings: [N, D] float32 gallery embeddings (kept by reference for the re-scoring).
        rerank_factor, min_candidates: candidates re-scored per query = max(k * rerank_factor, min_candidates).
        block_rows: gallery rows quantised and scanned at once.
        kernel: "fbgemm" (x86, default when available) or "int8pack".
    """

    kind = "int8"

    def __init__(self, embeddings: torch.Tensor, rerank_factor: int = RERANK_FACTOR,
                 min_candidates: int = MIN_CANDIDATES, block_rows: int = INT8_BLOCK_ROWS, kernel: str | None = None):
        if rerank_factor < 1 or min_candidates < 1:
            raise ValueError(f"rerank_factor and min_candidates must be >= 1, got {rerank_factor}, {min_candidates}")
        kernel = kernel or ("fbgemm" if _fbgemm_available() else "int8pack")
        if kernel not in ("fbgemm", "int8pack"):
            raise ValueError(f"unknown int8 kernel {kernel!r}: expected 'fbgemm' or 'int8pack'")
        if kernel == "fbgemm" and not _fbgemm_available():
            raise ValueError("the fbgemm kernel is not in this PyTorch build: use kernel='int8pack'")
        self.embeddings = embeddings
        self.rerank_factor = rerank_factor
        self.min_candidates = min_candidates
        self.kernel = kernel
        start = time.perf_counter()
        self.blocks = [self._pack(embeddings[s:s + block_rows].float())
                       for s in range(0, embeddings.shape[0], block_rows)]
        logger.info("int8 index of %d embeddings built in %.1f s (%s kernel)", embeddings.shape[0],
                    time.perf_counter() - start, kernel)

    def _pack(self, block: torch.Tensor):
        """[B, D] float32 -> what :meth:`_scan` multiplies by: codes int8 [B, D] with per-row scales [B]."""
        scale = block.abs().amax(dim=1).clamp_min(1e-12) / 127  # [B]: the row's largest |value| -> 127
        codes = torch.round(block / scale[:, None]).to(torch.int8)  # [B, D]
        if self.kernel == "int8pack":
            return codes, scale.bfloat16()
        with warnings.catch_warnings():  # "quantized tensor creation functions ... are deprecated": PyTorch-internal
            warnings.simplefilter("ignore", UserWarning)
            wq = torch._make_per_channel_quantized_tensor(codes, scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                                          0)
            engine = torch.backends.quantized.engine
            torch.backends.quantized.engine = "fbgemm"
            try:
                return torch.ops.quantized.linear_prepack(wq, None)
            finally:
                torch.backends.quantized.engine = engine

    def _scan(self, q: torch.Tensor) -> torch.Tensor:
        """Approximate scores q [Q, D] -> [Q, N] float32."""
        out = []
        for b in self.blocks:
            if self.kernel == "int8pack":
                codes, scale = b
                out.append(torch.ops.aten._weight_int8pack_mm(q.bfloat16(), codes, scale).float())  # [Q, B]
            else:
                out.append(torch.ops.quantized.linear_dynamic(q, b, True))  # [Q, B]
        return torch.cat(out, dim=1)

    def num_candidates(self, k: int) -> int:
        """How many int8 candidates are re-scored for a top-k (capped at the gallery size)."""
        return min(self.embeddings.shape[0], max(k * self.rerank_factor, self.min_candidates))

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q [Q, D] float32 -> (exact scores [Q, k], indices [Q, k]) of the best of the int8 candidates."""
        g = self.embeddings
        _check(q, g, k)
        c = self.num_candidates(k)
        if c >= g.shape[0]:
            return ExactIndex(g).search(q, k)  # every image would be re-scored anyway
        scores, indices = [], []
        for s in range(0, q.shape[0], QUERY_CHUNK):
            qc = q[s:s + QUERY_CHUNK].float().contiguous()  # [c_q, D]
            cand = self._scan(qc).topk(c, dim=1).indices  # [c_q, C]
            exact = torch.einsum("qd,qcd->qc", qc, g[cand].float())  # [c_q, C]: the candidates' exact cosines
            top, pos = exact.topk(k, dim=1)
            scores.append(top)
            indices.append(cand.gather(1, pos))
        return torch.cat(scores), torch.cat(indices)


def check_search_index(search_index: str, threshold: int) -> None:
    """ValueError naming the valid values for an unknown index name or a threshold below 1."""
    if search_index not in SEARCH_INDEXES:
        raise ValueError(f"unknown search index {search_index!r}: expected one of {', '.join(SEARCH_INDEXES)}")
    if threshold < 1:
        raise ValueError(f"the index threshold must be >= 1 image, got {threshold}")


def build_index(embeddings: torch.Tensor, search_index: str = DEFAULT_SEARCH_INDEX,
                threshold: int = DEFAULT_INDEX_THRESHOLD) -> ExactIndex | Int8Index:
    """The index :func:`Retriever.search` ranks ``embeddings`` [N, D] with: ``exact``, ``int8``, or ``auto`` (int8
    from ``threshold`` images on, exact below)."""
    check_search_index(search_index, threshold)
    if search_index == "int8" or (search_index == "auto" and embeddings.shape[0] >= threshold):
        return Int8Index(embeddings)
    return ExactIndex(embeddings)


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of |found ∩ exact| / k, for index rows [Q, k] of an index and of exact search."""
    if found.shape != exact.shape or found.ndim != 2:
        raise ValueError(f"recall_at_k needs two [Q, k] index tensors, got {tuple(found.shape)} and "
                         f"{tuple(exact.shape)}")
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return hits / found.numel()
