"""Text-to-image retrieval with a trained IRRA run (``Retriever``): encode sentences and images, rank a gallery
(cached in the run's ``gallery_cache/``).

Small API used by visualize.py (and usable from a notebook):

    r = Retriever.from_run("logs/CUHK-PEDES/<run>/")          # or .../configs.yaml
    gallery = r.encode_folder("my_photos/")                    # cached next to the run
    scores, idx = r.search("a man in a blue jacket", gallery.embeddings, topk=10)
    draw_search_grid(r.kept_text("a man in a blue jacket"), [gallery.paths[i] for i in idx], scores).save("out.png")

Embeddings are L2-normalised float32 on the CPU; similarity = text @ image.T (cosine), as in the evaluator.
A sentence longer than the run's ``text_length`` tokens is cut (as in training) with a warning saying how much was
kept; :meth:`Retriever.kept_text` gives the part the model saw. Empty or whitespace-only sentences are an error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from methods.base import Method
from methods.registry import get_method
from model.build import build_model_from_checkpoint
from utils.checkpoint import read_model_state_dict
from utils.comm import resolve_device
from utils.options import load_config_args
from utils.run_dir import BEST_CHECKPOINT, GALLERY_CACHE_DIR, atomic_write, check_writable, resolve_run
from search.gallery import ImageFileDataset, collate_skip_unreadable, list_images
from utils.simple_tokenizer import SimpleTokenizer, get_tokenizer, tokenize

logger = logging.getLogger("IRRA.retrieval")

CACHE_DIRNAME = GALLERY_CACHE_DIR
CACHE_VERSION = 1
# How many characters of a cut sentence the truncation warning quotes.
QUOTE_CHARS = 80


@dataclass
class TokenizedText:
    """A sentence as the text encoder sees it."""

    ids: torch.Tensor  # [L] long: SOT + BPE + EOT, zero-padded; cut to L when longer
    num_tokens: int    # SOT + BPE + EOT of the whole sentence, before cutting
    text: str          # the sentence, or (when cut) its kept BPE tokens decoded back to text

    @property
    def was_cut(self) -> bool:
        """Whether the sentence had more tokens than fit in ``ids``."""
        return self.num_tokens > self.ids.shape[0]


class QueryTokenizer:
    """Sentence -> :class:`TokenizedText` with the CLIP BPE, cut to ``text_length`` exactly as ``tokenize``
    (``utils.simple_tokenizer``, truncate=True) does in training: the first ``text_length - 1`` tokens, then EOT.

    Args:
        tokenizer: the BPE tokenizer.
        text_length: the run's ``--text_length`` (SOT and EOT included).
    """

    def __init__(self, tokenizer: SimpleTokenizer, text_length: int):
        if text_length < 3:
            raise ValueError(f"text_length must be >= 3 (SOT, one token, EOT), got {text_length}")
        self.tokenizer = tokenizer
        self.text_length = text_length

    def __call__(self, text: str) -> TokenizedText:
        bpe = self.tokenizer.encode(text)
        if not bpe:
            raise ValueError(f"query {text!r} holds no words once cleaned (html entities, whitespace): "
                             f"give a sentence describing the person")
        ids = tokenize(text, self.tokenizer, text_length=self.text_length, truncate=True)  # [L], as in training
        num_tokens = len(bpe) + 2  # + SOT, EOT
        if num_tokens <= self.text_length:
            return TokenizedText(ids, num_tokens, text)
        return TokenizedText(ids, num_tokens, self.tokenizer.decode(bpe[:self.text_length - 2]).strip())


def check_sentences(texts: Sequence[str]) -> None:
    """ValueError naming the sentence when one is not a string or is empty / whitespace only."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"query {i} must be a string, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"query {i} is empty or whitespace only ({t!r}): give a sentence describing the person")


def _warn_cut(tokenized: Sequence[TokenizedText]) -> None:
    """One warning for the sentences that were cut to the text length (how many tokens kept, of how many)."""
    cut = [(i, t) for i, t in enumerate(tokenized) if t.was_cut]
    if not cut:
        return
    length = cut[0][1].ids.shape[0]
    if len(cut) == 1:
        i, t = cut[0]
        quote = t.text if len(t.text) <= QUOTE_CHARS else t.text[:QUOTE_CHARS] + "..."
        logger.warning("%s is longer than text_length=%d tokens: cut, kept %d of %d tokens (SOT/EOT included); "
                       "the model sees %r", "the query" if len(tokenized) == 1 else f"query {i}", length, length,
                       t.num_tokens, quote)
    else:
        logger.warning("%d of %d queries are longer than text_length=%d tokens: cut, each kept %d tokens "
                       "(of %d to %d, SOT/EOT included)", len(cut), len(tokenized), length, length,
                       min(t.num_tokens for _, t in cut), max(t.num_tokens for _, t in cut))


@dataclass
class Gallery:
    """Encoded gallery: ``embeddings[j]`` belongs to ``paths[j]``, which was ``indices[j]`` in the input list."""

    paths: list[str]
    embeddings: torch.Tensor  # [N, D] float32, L2-normalised, CPU
    indices: list[int]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _file_stamp(path: str | os.PathLike) -> list:
    """[absolute path, mtime_ns, size] of a file; what the cache key is made of."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_mtime_ns, st.st_size]


STALE = "stale"  # cache_problem: a well-formed cache of other files, weights or image size (re-encoded quietly)
CACHE_KEYS = ("key", "paths", "embeddings", "indices", "skipped")


def cache_problem(c, key: str, paths: Sequence[str]) -> str | None:
    """Why the loaded gallery cache ``c`` cannot stand for encoding ``paths`` now: None when it can, :data:`STALE`
    when it is well-formed but its key differs, else what is wrong (type, keys, shapes, non-finite values, rows that
    do not match the paths). Any doubt means re-encoding."""
    if not isinstance(c, dict):
        return f"expected a dict, got {type(c).__name__}"
    missing = [k for k in CACHE_KEYS if k not in c]
    if missing:
        return f"missing keys {missing}"
    if c["key"] != key:
        return STALE
    emb, kept, indices, skipped = c["embeddings"], c["paths"], c["indices"], c["skipped"]
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.is_floating_point():
        return f"embeddings must be a float [N, D] tensor, got {type(emb).__name__} {getattr(emb, 'shape', '')}"
    if not all(isinstance(v, list) for v in (kept, indices, skipped)):
        return "paths, indices and skipped must be lists"
    if not (emb.shape[0] == len(kept) == len(indices)) or emb.shape[0] == 0:
        return f"{emb.shape[0]} embedding rows for {len(kept)} paths and {len(indices)} indices"
    if not all(isinstance(i, int) and 0 <= i < len(paths) and paths[i] == p for i, p in zip(indices, kept)):
        return "its paths are not the gallery's files at their indices"
    if len(kept) + len(skipped) != len(paths) or not set(skipped) <= set(paths):
        return f"{len(kept)} kept + {len(skipped)} skipped images for a gallery of {len(paths)}"
    if not bool(torch.isfinite(emb).all()):
        return "embeddings hold NaN or infinite values"
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


def _warn_skipped(skipped: Sequence[str]) -> None:
    if skipped:
        logger.warning("skipped %d image(s) that could not be opened: %s", len(skipped), ", ".join(skipped))


class Retriever:
    """A trained IRRA model wrapped for retrieval: encode sentences and images, rank a gallery.

    Build it with :meth:`from_run`; the constructor takes ready parts so tests can pass small stand-ins.

    Args:
        model: module with ``encode_text(ids [B, L]) -> [B, D]`` and ``encode_image(imgs [B, 3, H, W]) -> [B, D]``.
        transform: PIL image -> float tensor [3, H, W] (the test transform of the run).
        tokenize: sentence -> :class:`TokenizedText` (a :class:`QueryTokenizer`).
        device: where the model lives.
        run_dir: the run folder; gallery caches go to ``<run_dir>/gallery_cache`` (None: no caching by default).
        checkpoint: the loaded weights file, part of the cache key (a new checkpoint re-encodes).
        args: the run's options (``img_size`` is part of the cache key; the test split comes from them).
        batch_size: sentences / images per forward pass.
        num_workers: image loading processes.
        method: the run's method (``methods.base.Method``: its ``encode_images`` / ``encode_texts`` give the
            feature sets); default: the model's own ``encode_image`` / ``encode_text``.
        feature_set: the set ranked (default: the method's default, e.g. RDE's ``bge+tse``).
    """

    def __init__(self, model: torch.nn.Module, transform: Callable, tokenize: Callable[[str], TokenizedText],
                 device: torch.device, run_dir: str | os.PathLike | None = None,
                 checkpoint: str | os.PathLike | None = None, args=None, batch_size: int = 64,
                 num_workers: int = 0, method: Method | None = None, feature_set: str | None = None):
        self.method = method if method is not None else Method()
        self.feature_set = self.method.check_feature_set(feature_set)
        self.model = model.eval()
        self.transform = transform
        self.tokenize = tokenize
        self.device = torch.device(device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.args = args
        self.batch_size = batch_size
        self.num_workers = num_workers

    # ---------------------------------------------------------------- construction from a run directory
    @classmethod
    def from_run(cls, run: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 device: str | torch.device = "auto", batch_size: int = 64, num_workers: int = 0,
                 feature_set: str | None = None) -> "Retriever":
        """Load the model of a training run.

        Args:
            run: the run directory (``logs/<dataset>/<time>_<name>/``) or its ``configs.yaml``.
            checkpoint: weights file; default ``<run_dir>/best.pth``.
            device: "auto" | "cpu" | an accelerator spec understood by ``utils.comm.resolve_device``, or a device.
            batch_size: sentences / images per forward pass.
            num_workers: image loading processes.
            feature_set: the method's feature set ranked (default: the method's default).
        """
        run_dir, config_file = (Path(p) for p in resolve_run(run))
        ckpt = Path(checkpoint) if checkpoint is not None else run_dir / BEST_CHECKPOINT
        if checkpoint is not None and not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {str(ckpt)!r} (given with --checkpoint) not found")
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {str(ckpt)!r} not found: the run in {str(run_dir)!r} has no "
                                    f"{BEST_CHECKPOINT} (was it trained to the first evaluation?); pass a checkpoint "
                                    f"explicitly (e.g. last.pth) otherwise")

        # utils.iotools.load_train_configs + today's defaults for options older runs lack (device, precision...)
        args = load_config_args(str(config_file), training=False)
        dev = device if isinstance(device, torch.device) else resolve_device(str(device))
        weights = read_model_state_dict(str(ckpt))  # read once: backbone, classes and weights all come from it
        model = build_model_from_checkpoint(args, weights, source=str(ckpt), config=str(config_file), device=dev)

        method = get_method(args.method)
        return cls(model, method.test_transform(args), QueryTokenizer(get_tokenizer(), int(args.text_length)), dev,
                   run_dir=run_dir, checkpoint=ckpt, args=args, batch_size=batch_size, num_workers=num_workers,
                   method=method, feature_set=feature_set)

    # ---------------------------------------------------------------- encoders
    def kept_text(self, text: str) -> str:
        """The part of ``text`` the text encoder sees: all of it, or its first tokens decoded back when cut."""
        check_sentences([text])
        return self.tokenize(text).text

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentences -> [N, D] float32 L2-normalised CPU embeddings.

        Raises ValueError for an empty list or an empty / whitespace-only sentence; a sentence longer than the
        text length is cut with one warning (how many tokens were kept, of how many).
        """
        if isinstance(texts, str):
            raise TypeError("encode_texts expects a list of strings, got a single string")
        texts = list(texts)
        if not texts:
            raise ValueError("encode_texts got an empty list of sentences")
        check_sentences(texts)
        tokenized = [self.tokenize(t) for t in texts]
        _warn_cut(tokenized)
        out = []
        for start in range(0, len(tokenized), self.batch_size):
            ids = torch.stack([t.ids for t in tokenized[start:start + self.batch_size]])  # [B, L]
            f = self.method.encode_texts(self.model, ids.to(self.device))[self.feature_set]  # [B, D]
            out.append(F.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, paths: Sequence[str], progress: bool = True) -> Gallery:
        """Image files -> :class:`Gallery`. Files that fail to open are skipped with one warning listing them.

        Raises ValueError when ``paths`` is empty or no file could be read.
        """
        paths = [str(p) for p in paths]
        if not paths:
            raise ValueError("cannot encode an empty gallery: no image paths given")
        loader = DataLoader(ImageFileDataset(paths, self.transform), batch_size=self.batch_size,
                            num_workers=self.num_workers, collate_fn=collate_skip_unreadable)
        kept, failed, feats = [], [], []
        with tqdm(total=len(paths), desc="encoding images", unit="img", disable=not progress) as bar:
            for idx, imgs, bad in loader:
                failed += bad
                if imgs is not None:
                    f = self.method.encode_images(self.model, imgs.to(self.device))[self.feature_set]  # [B, D]
                    feats.append(F.normalize(f.float(), dim=-1).cpu())
                    kept += idx
                bar.update(len(idx) + len(bad))
        skipped = [paths[i] for i in failed]
        _warn_skipped(skipped)
        if not kept:
            raise ValueError(f"none of the {len(paths)} gallery images could be opened")
        return Gallery([paths[i] for i in kept], torch.cat(feats), kept, skipped)

    # ---------------------------------------------------------------- cached galleries
    def default_cache_dir(self) -> Path | None:
        """``<run_dir>/gallery_cache`` or None when the retriever has no run directory."""
        return self.run_dir / CACHE_DIRNAME if self.run_dir is not None else None

    def _cache_key(self, paths: Sequence[str]) -> str:
        """Hash of (file list with mtimes and sizes, checkpoint stamp, image size of the transform)."""
        key = {
            "version": CACHE_VERSION,
            "files": [_file_stamp(p) for p in paths],
            "checkpoint": _file_stamp(self.checkpoint) if self.checkpoint is not None else None,
            "img_size": list(self.args.img_size) if self.args is not None else None,
            "features": [self.method.name, self.feature_set],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def encode_gallery(self, paths: Sequence[str], cache_name: str, cache_dir: str | os.PathLike | None = None,
                       progress: bool = True) -> Gallery:
        """Like :meth:`encode_images`, reusing ``<cache_dir>/<cache_name>.pt`` while its key still matches.

        The key covers every file's path, mtime and size and the checkpoint's, so adding/changing a file or
        loading other weights re-encodes (and overwrites the cache). A cache is never trusted blindly: one of the
        wrong type, keys or shapes, with non-finite embeddings or rows that do not match the paths is re-encoded
        with a warning (:func:`cache_problem`). ``cache_dir`` defaults to :meth:`default_cache_dir`; with neither,
        nothing is cached. A cache folder that cannot be created or written (a file at its path) is found before
        encoding: the search runs without the cache, with a warning.
        """
        paths = [str(p) for p in paths]
        if not paths:
            raise ValueError("cannot encode an empty gallery: no image paths given")
        cache_dir = Path(cache_dir) if cache_dir is not None else self.default_cache_dir()
        if cache_dir is None:
            return self.encode_images(paths, progress=progress)
        cache_file = cache_dir / f"{cache_name}.pt"
        key = self._cache_key(paths)
        if cache_file.is_file():
            try:
                c = torch.load(cache_file, map_location="cpu", weights_only=True)
            except Exception as e:  # a corrupt cache is re-made, never fatal
                logger.warning("ignoring unreadable gallery cache %s (%s)", cache_file, e)
                c = None
            if c is not None:
                problem = cache_problem(c, key, paths)
                if problem is None:
                    logger.info("using cached gallery embeddings %s (%d images)", cache_file, len(c["paths"]))
                    _warn_skipped(c["skipped"])
                    return Gallery(list(c["paths"]), c["embeddings"], list(c["indices"]), list(c["skipped"]))
                if problem != STALE:
                    logger.warning("ignoring gallery cache %s: %s; encoding the gallery again", cache_file, problem)
        # the cache folder is checked before the (long) encoding: a folder that cannot be written only loses the cache
        writable = _usable_cache_dir(cache_dir)
        gallery = self.encode_images(paths, progress=progress)
        if writable:
            data = {"key": key, "paths": gallery.paths, "embeddings": gallery.embeddings, "indices": gallery.indices,
                    "skipped": gallery.skipped}
            try:  # a concurrent reader sees the old or the new file
                atomic_write(cache_file, lambda f: torch.save(data, f))
                logger.info("cached gallery embeddings in %s", cache_file)
            except OSError as e:
                logger.warning("gallery embeddings not cached in %s (%s)", cache_file, e)
        return gallery

    def encode_folder(self, folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      progress: bool = True) -> Gallery:
        """Encode every image under ``folder`` (recursively), cached per folder next to the run."""
        paths = list_images(folder)
        name = "folder_" + hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:16]
        return self.encode_gallery(paths, name, cache_dir=cache_dir, progress=progress)

    # ---------------------------------------------------------------- ranking
    def search(self, query: str | Sequence[str] | torch.Tensor, gallery_embeddings: torch.Tensor | Gallery,
               topk: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank the gallery by cosine similarity to the query sentence(s).

        Args:
            query: a sentence, a list of sentences, or text embeddings [Q, D] / [D].
            gallery_embeddings: [N, D] normalised image embeddings (or a :class:`Gallery`).
            topk: how many to return (capped at N).
        Returns:
            (scores, indices) sorted by descending score: [k] each for a single sentence / [D] embedding,
            [Q, k] for a list / [Q, D].
        """
        g = gallery_embeddings.embeddings if isinstance(gallery_embeddings, Gallery) else gallery_embeddings
        if g.ndim != 2 or g.shape[0] == 0:
            raise ValueError(f"gallery embeddings must be a non-empty [N, D] tensor, got shape {tuple(g.shape)}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        single = isinstance(query, str) or (isinstance(query, torch.Tensor) and query.ndim == 1)
        if isinstance(query, str):
            q = self.encode_texts([query])
        elif isinstance(query, torch.Tensor):
            q = F.normalize(query.float().reshape(-1, query.shape[-1]), dim=-1)  # [D] -> [1, D]
        else:
            q = self.encode_texts(list(query))
        sim = q @ g.float().T  # [Q, N]
        scores, indices = sim.topk(min(topk, g.shape[0]), dim=1)
        return (scores[0], indices[0]) if single else (scores, indices)
