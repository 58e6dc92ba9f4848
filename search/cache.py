"""The run's ``gallery_cache/``: image embeddings cached per file, caption embeddings cached per caption list.

Both are keyed by the model that made them (:func:`model_identity`: run folder, checkpoint path + mtime + size,
method and feature set, model class, and the image size or text length) and never trusted blindly: a cache file that
cannot be read, is of the wrong shape or holds non-finite values is rebuilt with a warning; one of another model is
rebuilt quietly. Writes are atomic (a concurrent reader sees the old or the new file).

Gallery cache ``<name>.pt`` (version 2), one entry per image file, so a gallery that grows re-encodes only its new
(or changed) files and a removed file drops out::

    {"version": 2, "model": <model key>, "paths": "<abs path>\\0<abs path>...", "mtime_ns": int64 [M],
     "size": int64 [M], "rows": int64 [M] (row of "embeddings", -1: could not be read), "embeddings": float [R, D]}

Caption cache ``<name>.pt``: ``{"version": 1, "key": <model key + captions hash>, "embeddings": float [Q, D]}``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from search.gallery import Gallery, warn_skipped
from utils.run_dir import atomic_write, check_writable

logger = logging.getLogger("IRRA.retrieval")

GALLERY_CACHE_VERSION = 2
CAPTION_CACHE_VERSION = 1
STALE = "stale"  # cache_problem: a well-formed cache of another model (re-encoded quietly)
GALLERY_KEYS = ("version", "model", "paths", "mtime_ns", "size", "rows", "embeddings")
CAPTION_KEYS = ("version", "key", "embeddings")
NOT_READ = -1  # rows: the file could not be read at this (mtime, size); it is tried again once it changes


def file_stamp(path: str | os.PathLike) -> tuple[str, int, int]:
    """(absolute path, mtime_ns, size) of a file; (absolute path, -1, -1) when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.abspath(path), -1, -1
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def model_identity(retriever, **inputs) -> str:
    """Hash of what makes an embedding: the run, the checkpoint's stamp, the retriever's method name and feature set,
    the model's class, plus ``inputs`` (the image size, or the text length and the captions)."""
    ckpt = retriever.checkpoint
    return _hash({
        "run": os.path.abspath(retriever.run_dir) if retriever.run_dir is not None else None,
        "checkpoint": list(file_stamp(ckpt)) if ckpt is not None else None,
        "features": [retriever.method.name, retriever.feature_set],
        "model": f"{type(retriever.model).__module__}.{type(retriever.model).__qualname__}",
        **inputs,
    })


def _embeddings_problem(emb, rows: int | None = None) -> str | None:
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.is_floating_point():
        return f"embeddings must be a float [N, D] tensor, got {type(emb).__name__} {getattr(emb, 'shape', '')}"
    if rows is not None and emb.shape[0] != rows:
        return f"{emb.shape[0]} embedding rows for {rows} captions"
    if not bool(torch.isfinite(emb).all()):
        return "embeddings hold NaN or infinite values"
    return None


def gallery_cache_problem(c, model_key: str) -> str | None:
    """Why the loaded gallery cache ``c`` cannot be used: None when it can, :data:`STALE` when it is well-formed
    but of another model (or an older format), else what is wrong. Any doubt means re-encoding."""
    if not isinstance(c, dict):
        return f"expected a dict, got {type(c).__name__}"
    if c.get("version") != GALLERY_CACHE_VERSION and "key" in c:
        return STALE  # version 1: one key for the whole list of files
    missing = [k for k in GALLERY_KEYS if k not in c]
    if missing:
        return f"missing keys {missing}"
    if c["version"] != GALLERY_CACHE_VERSION or c["model"] != model_key:
        return STALE
    emb, paths = c["embeddings"], c["paths"]
    problem = _embeddings_problem(emb)
    if problem:
        return problem
    if not isinstance(paths, str):
        return f"paths must be one string, got {type(paths).__name__}"
    m = len(paths.split("\0")) if paths else 0
    for name in ("mtime_ns", "size", "rows"):
        t = c[name]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (m,):
            return f"{name} must be an int64 tensor of {m} entries (one per path), got {getattr(t, 'shape', t)!r}"
    rows = c["rows"]
    if m and (int(rows.min()) < NOT_READ or int(rows.max()) >= emb.shape[0]):
        return f"rows must be -1 or in 0..{emb.shape[0] - 1}"
    return None


def _load(cache_file: Path, what: str):
    """The cache file's object, or None (with a warning when it exists but cannot be read)."""
    if not cache_file.is_file():
        return None
    try:
        return torch.load(cache_file, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt cache is re-made, never fatal
        logger.warning("ignoring unreadable %s cache %s (%s)", what, cache_file, e)
        return None


def _usable_cache_dir(cache_dir: Path) -> bool:
    """Create ``cache_dir`` and check that a file can be written there; False (with a warning: the search runs
    without the cache) when it cannot, e.g. a file sits at its path."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        check_writable(str(cache_dir), "gallery cache")
    except OSError as e:
        logger.warning("gallery cache folder %s cannot be used (%s): searching without the cache", cache_dir, e)
        return False
    return True


def _save(cache_file: Path, data: dict, what: str) -> None:
    try:
        atomic_write(cache_file, lambda f: torch.save(data, f))
        logger.info("cached %s embeddings in %s", what, cache_file)
    except OSError as e:
        logger.warning("%s embeddings not cached in %s (%s)", what, cache_file, e)


def encode_gallery_cached(retriever, paths: Sequence[str], cache_file: Path, progress: bool = True) -> Gallery:
    """``retriever.encode_images`` of the files of ``paths`` not in ``cache_file`` at their current (path, mtime,
    size); the rest comes from the cache, which is then rewritten with exactly the files of ``paths``."""
    paths = [str(p) for p in paths]
    key = model_identity(retriever, img_size=list(retriever.args.img_size) if retriever.args is not None else None)
    stamps = [file_stamp(p) for p in paths]
    c = _load(cache_file, "gallery")
    cached: dict[str, tuple[int, int, int]] = {}
    emb_cached = None
    if c is not None:
        problem = gallery_cache_problem(c, key)
        if problem is None:
            names = c["paths"].split("\0") if c["paths"] else []
            cached = dict(zip(names, zip(c["mtime_ns"].tolist(), c["size"].tolist(), c["rows"].tolist())))
            emb_cached = c["embeddings"]
        elif problem != STALE:
            logger.warning("ignoring gallery cache %s: %s; encoding the gallery again", cache_file, problem)
    # each file: a cached row, a cached failure, or to encode (new, changed, or never cached)
    source: list[tuple[str, int]] = []  # ("cache", row) | ("new", position in to_encode) | ("failed", -1)
    to_encode: dict[str, int] = {}
    for p, (ap, mtime, size) in zip(paths, stamps):
        hit = cached.get(ap)
        if mtime >= 0 and hit is not None and hit[:2] == (mtime, size):
            source.append(("cache", hit[2]) if hit[2] != NOT_READ else ("failed", NOT_READ))
        else:
            source.append(("new", to_encode.setdefault(p, len(to_encode))))
    new_rows: dict[int, int] = {}
    new_emb = None
    if to_encode:
        logger.info("encoding %d of %d gallery images (%d from the cache %s)", len(to_encode), len(paths),
                    len(paths) - sum(s == "new" for s, _ in source), cache_file)
        writable = _usable_cache_dir(cache_file.parent)
        todo = list(to_encode)
        try:
            g = retriever.encode_images(todo, progress=progress)
            new_rows = dict(zip(g.indices, range(len(g))))  # position in todo -> row of g.embeddings
            new_emb = g.embeddings
        except ValueError:  # none of the new files could be read (encode_images warned, naming them)
            if len(todo) == len(paths):
                raise
        if emb_cached is not None and new_emb is not None and new_emb.shape[1] != emb_cached.shape[1]:
            logger.warning("ignoring gallery cache %s: its embeddings are %d wide, the model's %d; encoding the "
                           "gallery again", cache_file, emb_cached.shape[1], new_emb.shape[1])
            cache_file.unlink(missing_ok=True)
            return encode_gallery_cached(retriever, paths, cache_file, progress)
    else:
        writable = False
    # the gallery in the order of paths: rows of the cached and of the new embeddings
    kept, indices, skipped, parts = [], [], [], []
    for i, (p, (kind, pos)) in enumerate(zip(paths, source)):
        if kind == "cache":
            parts.append(("c", pos))
        elif kind == "new" and pos in new_rows:
            parts.append(("n", new_rows[pos]))
        else:
            skipped.append(p)
            continue
        kept.append(p)
        indices.append(i)
    if not kept:
        raise ValueError(f"none of the {len(paths)} gallery images could be opened")
    width = (emb_cached if emb_cached is not None else new_emb).shape[1]
    emb = torch.empty(len(kept), width)
    for tag, src in (("c", emb_cached), ("n", new_emb)):
        where = [j for j, (t, _) in enumerate(parts) if t == tag]
        if where:
            emb[where] = src[[parts[j][1] for j in where]].float()
    if not to_encode:
        logger.info("using cached gallery embeddings %s (%d images)", cache_file, len(kept))
    warn_skipped([p for p, (kind, _) in zip(paths, source) if kind == "failed"])  # new failures: warned above
    removed = len(set(cached) - {s[0] for s in stamps})
    if (to_encode or removed) and (writable or _usable_cache_dir(cache_file.parent)):
        row_of = {p: r for r, p in enumerate(kept)}
        _save(cache_file, {
            "version": GALLERY_CACHE_VERSION, "model": key, "paths": "\0".join(s[0] for s in stamps),
            "mtime_ns": torch.tensor([s[1] for s in stamps], dtype=torch.int64),
            "size": torch.tensor([s[2] for s in stamps], dtype=torch.int64),
            "rows": torch.tensor([row_of.get(p, NOT_READ) for p in paths], dtype=torch.int64),
            "embeddings": emb}, "gallery")
    return Gallery(kept, emb, indices, skipped)


def caption_cache_key(retriever, texts: Sequence[str]) -> str:
    """Model identity + text length + a hash of the captions (their order and count included)."""
    captions = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    return model_identity(retriever, text_length=getattr(retriever.tokenize, "text_length", None),
                          captions=[len(texts), captions])


def encode_texts_cached(retriever, texts: Sequence[str], cache_file: Path) -> torch.Tensor:
    """``retriever.encode_texts(texts)``, read from ``cache_file`` while its key (:func:`caption_cache_key`) holds."""
    texts = list(texts)
    key = caption_cache_key(retriever, texts)
    c = _load(cache_file, "caption")
    if c is not None:
        if not isinstance(c, dict):
            problem = f"expected a dict, got {type(c).__name__}"
        elif [k for k in CAPTION_KEYS if k not in c]:
            problem = f"missing keys {[k for k in CAPTION_KEYS if k not in c]}"
        elif c["version"] != CAPTION_CACHE_VERSION or c["key"] != key:
            problem = STALE
        else:
            problem = _embeddings_problem(c["embeddings"], len(texts))
        if problem is None:
            logger.info("using cached caption embeddings %s (%d captions)", cache_file, len(texts))
            return c["embeddings"].float()
        if problem != STALE:
            logger.warning("ignoring caption cache %s: %s; encoding the captions again", cache_file, problem)
    writable = _usable_cache_dir(cache_file.parent)
    logger.info("encoding %d captions", len(texts))
    emb = retriever.encode_texts(texts)
    if writable:
        _save(cache_file, {"version": CAPTION_CACHE_VERSION, "key": key, "embeddings": emb}, "caption")
    return emb
