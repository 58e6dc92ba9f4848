"""The test split of a run's dataset as queries and gallery, for visualize.py: every caption ranked against every test
image, and the grids of chosen queries.

    r = Retriever.from_run("logs/CUHK-PEDES/<run>/")
    split = load_test_split(r.args)
    results = rank_test_queries(r, split, topk=10)              # [QueryResult], one per test caption
    for res in pick_queries(results, num_queries=5, failures=True):
        draw_query_grid(res).save(f"query_{res.index:05d}.png")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from datasets.build import build_dataset
from search.retrieval import Gallery, Retriever
from search.grid import DEFAULT_TILE_SIZE, GT_COLOR, MATCH_COLOR, MISMATCH_COLOR, Tile, draw_grid, slug


def load_test_split(args) -> dict:
    """The run dataset's test dict {image_pids, img_paths, caption_pids, captions} (datasets.build registry)."""
    return build_dataset(args.dataset_name, root=args.root_dir, verbose=False, anno_file=args.anno_file).test


@dataclass
class QueryResult:
    """One test query ranked against the test gallery."""

    index: int
    caption: str
    pid: int
    gt_path: str | None
    paths: list[str]
    pids: list[int]
    scores: list[float]

    @property
    def top1_correct(self) -> bool:
        """Whether the first-ranked gallery image has the query's identity."""
        return bool(self.pids) and self.pids[0] == self.pid


def encode_test_gallery(retriever: Retriever, split: dict, progress: bool = True) -> Gallery:
    """The test split's images, cached next to the run like a folder gallery."""
    name = "test_" + slug(str(retriever.args.dataset_name))
    return retriever.encode_gallery(split["img_paths"], name, progress=progress)


def encode_test_captions(retriever: Retriever, split: dict) -> torch.Tensor:
    """The test split's captions [Q, D], cached next to the run beside its gallery (a second start reads them)."""
    name = "test_" + slug(str(retriever.args.dataset_name)) + "_captions"
    return retriever.encode_captions(list(split["captions"]), name)


def rank_test_queries(retriever: Retriever, split: dict, topk: int = 10, progress: bool = True
                      ) -> list[QueryResult]:
    """Encode the whole test split (gallery cached next to the run) and rank every caption.

    The ground-truth image shown for a query is the first test image of its identity (the test dict does not
    say which image a caption was written for).
    """
    gallery = encode_test_gallery(retriever, split, progress=progress)
    g_pids = [int(split["image_pids"][i]) for i in gallery.indices]
    first_of_pid: dict[int, str] = {}
    for pid, path in zip(split["image_pids"], split["img_paths"]):
        first_of_pid.setdefault(int(pid), path)
    captions = list(split["captions"])
    scores, indices = retriever.search(encode_test_captions(retriever, split), gallery, topk)  # [Q, k]
    results = []
    for q, (caption, pid) in enumerate(zip(captions, split["caption_pids"])):
        idx = indices[q].tolist()
        results.append(QueryResult(q, caption, int(pid), first_of_pid.get(int(pid)), [gallery.paths[i] for i in idx],
                                   [g_pids[i] for i in idx], scores[q].tolist()))
    return results


def check_query_indices(query_indices: Sequence[int] | None, num_queries: int) -> None:
    """ValueError naming the valid range when an index is not a test query (checked before any encoding)."""
    bad = [i for i in query_indices or [] if not 0 <= i < num_queries]
    if bad:
        raise ValueError(f"--query_index {bad} out of range: the test split has {num_queries} queries "
                         f"(valid 0..{num_queries - 1})")


def pick_queries(results: Sequence[QueryResult], query_indices: Sequence[int] | None = None,
                 num_queries: int = 5, failures: bool = False) -> list[QueryResult]:
    """Explicit indices (validated), else ``num_queries`` spread evenly over all (or only top-1-wrong) queries."""
    if query_indices:
        check_query_indices(query_indices, len(results))
        return [results[i] for i in query_indices]
    pool = [r for r in results if not r.top1_correct] if failures else list(results)
    if not pool or num_queries < 1:
        return []
    n = min(num_queries, len(pool))
    return [pool[round(i * (len(pool) - 1) / max(n - 1, 1))] for i in range(n)]


def query_title(result: QueryResult) -> str:
    """The caption line of a test-query grid."""
    return f"[query {result.index}, pid {result.pid}] {result.caption}"


def draw_query_grid(result: QueryResult, tile_size: tuple[int, int] = DEFAULT_TILE_SIZE) -> Image.Image:
    """Test query: ground truth (blue) then the top-k, green when the identity matches, red otherwise."""
    tiles = [Tile(result.gt_path, ["ground truth", f"pid {result.pid}"], GT_COLOR)]
    for r, (path, pid, score) in enumerate(zip(result.paths, result.pids, result.scores), start=1):
        tiles.append(Tile(path, [f"#{r}  sim {score:.3f}", f"pid {pid}"],
                          MATCH_COLOR if pid == result.pid else MISMATCH_COLOR))
    return draw_grid(query_title(result), tiles, tile_size)
