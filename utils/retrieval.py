"""Text-to-image retrieval with a trained IRRA run, plus PIL drawing of result grids.

Small API used by visualize.py (and usable from a notebook):

    r = Retriever.from_run("logs/CUHK-PEDES/<run>/")          # or .../configs.yaml
    gallery = r.encode_folder("my_photos/")                    # cached next to the run
    scores, idx = r.search("a man in a blue jacket", gallery.embeddings, topk=10)
    draw_search_grid("a man in a blue jacket", [gallery.paths[i] for i in idx], scores).save("out.png")

Embeddings are L2-normalised float32 on the CPU; similarity = text @ image.T (cosine), as in the evaluator.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from tqdm import tqdm

logger = logging.getLogger("IRRA.retrieval")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CACHE_DIRNAME = "gallery_cache"
CACHE_VERSION = 1

# Grid colours (RGB). Frames are solid, so a test can read them back from the PNG.
MATCH_COLOR = (0, 170, 0)        # gallery image has the query's identity
MISMATCH_COLOR = (210, 0, 0)     # gallery image of another identity
GT_COLOR = (30, 90, 220)         # the query identity's ground-truth image
NEUTRAL_COLOR = (150, 150, 150)  # free-text search: no identities, no verdict
BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (235, 235, 235)
TEXT_COLOR = (0, 0, 0)

# Grid geometry (pixels).
DEFAULT_TILE_SIZE = (128, 256)   # (width, height) of the image area of one tile
MARGIN = 10
FRAME = 5
TILE_GAP = 8
CAPTION_FONT_SIZE = 16
LABEL_FONT_SIZE = 12
LABEL_LINES = 2


# --------------------------------------------------------------------------------------------- encoding


class _ImageFiles(torch.utils.data.Dataset):
    """Images by path; an image that cannot be opened yields ``(index, None)`` instead of raising."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        try:
            with Image.open(self.paths[index]) as img:
                img = img.convert("RGB")
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
            return index, None
        return index, self.transform(img)


def _collate_skip_failed(batch: list[tuple[int, torch.Tensor | None]]
                         ) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """Collate (index, tensor-or-None) pairs: returns (ok indices, stacked images or None, failed indices)."""
    ok = [(i, x) for i, x in batch if x is not None]
    failed = [i for i, x in batch if x is None]
    if not ok:
        return [], None, failed
    return [i for i, _ in ok], torch.stack([x for _, x in ok]), failed


@dataclass
class Gallery:
    """Encoded gallery: ``embeddings[j]`` belongs to ``paths[j]``, which was ``indices[j]`` in the input list."""

    paths: list[str]
    embeddings: torch.Tensor  # [N, D] float32, L2-normalised, CPU
    indices: list[int]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def list_images(folder: str | os.PathLike) -> list[str]:
    """All .jpg/.jpeg/.png files under ``folder`` (recursively, case-insensitive), sorted.

    Raises FileNotFoundError when the folder does not exist and ValueError when it holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"gallery folder {str(root)!r} does not exist or is not a directory")
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"gallery folder {str(root)!r} contains no images (expected files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
    return paths


def _file_stamp(path: str | os.PathLike) -> list:
    """[absolute path, mtime_ns, size] of a file; what the cache key is made of."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_mtime_ns, st.st_size]


class Retriever:
    """A trained IRRA model wrapped for retrieval: encode sentences and images, rank a gallery.

    Build it with :meth:`from_run`; the constructor takes ready parts so tests can pass small stand-ins.

    Args:
        model: module with ``encode_text(ids [B, L]) -> [B, D]`` and ``encode_image(imgs [B, 3, H, W]) -> [B, D]``.
        transform: PIL image -> float tensor [3, H, W] (the test transform of the run).
        tokenize: caption -> LongTensor [L] (SOT + BPE + EOT, padded).
        device: where the model lives.
        run_dir: the run folder; gallery caches go to ``<run_dir>/gallery_cache`` (None: no caching by default).
        checkpoint: the loaded weights file, part of the cache key (a new checkpoint re-encodes).
        args: the run's options (needed by :func:`load_test_split` / test-set visualisation).
    """

    def __init__(self, model: torch.nn.Module, transform: Callable, tokenize: Callable[[str], torch.Tensor],
                 device: torch.device, run_dir: str | os.PathLike | None = None,
                 checkpoint: str | os.PathLike | None = None, args=None, batch_size: int = 64,
                 num_workers: int = 0):
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
                 device: str | torch.device = "auto", batch_size: int = 64, num_workers: int = 0) -> "Retriever":
        """Load the model of a training run.

        Args:
            run: the run directory (``logs/<dataset>/<time>_<name>/``) or its ``configs.yaml``.
            checkpoint: weights file; default ``<run_dir>/best.pth``.
            device: "auto" | "cpu" | an accelerator spec understood by ``utils.comm.resolve_device``, or a device.
        """
        run = Path(run)
        if run.is_dir():
            run_dir, config_file = run, run / "configs.yaml"
        else:
            run_dir, config_file = run.parent, run
        if not config_file.is_file():
            raise FileNotFoundError(f"no run configuration at {str(config_file)!r}: expected a run directory "
                                    f"(logs/<dataset>/<time>_<name>/) containing configs.yaml, or that file")
        ckpt = Path(checkpoint) if checkpoint is not None else run_dir / "best.pth"
        if checkpoint is not None and not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {str(ckpt)!r} (given with --checkpoint) not found")
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {str(ckpt)!r} not found: the run in {str(run_dir)!r} has no "
                                    f"best.pth (was it trained to the first evaluation?); pass a checkpoint "
                                    f"explicitly (e.g. last.pth) otherwise")

        from datasets.build import build_transforms
        from model.build import build_model
        from utils.checkpoint import (Checkpointer, checkpoint_num_classes, clip_state_dict_from_checkpoint,
                                      read_model_state_dict)
        from utils.comm import resolve_device
        from utils.options import load_config_args
        from utils.simple_tokenizer import SimpleTokenizer, tokenize

        # utils.iotools.load_train_configs + today's defaults for options older runs lack (device, precision...)
        args = load_config_args(str(config_file), training=False)
        dev = device if isinstance(device, torch.device) else resolve_device(str(device))
        # num_classes must match the trained classifier; it exists only when the run used the id loss.
        weights = read_model_state_dict(str(ckpt))  # read once for the two lookups below
        num_classes = checkpoint_num_classes(weights)
        # the backbone comes from the checkpoint itself: no pretrained CLIP file needed
        clip_sd = clip_state_dict_from_checkpoint(weights)
        if num_classes is not None:
            model = build_model(args, num_classes, dev, clip_state_dict=clip_sd)
        else:
            model = build_model(args, device=dev, clip_state_dict=clip_sd)  # no classifier: num_classes unused
        Checkpointer(model).load(str(ckpt))
        model.to(dev)

        img_size = tuple(int(s) for s in args.img_size)
        tokenizer = SimpleTokenizer()
        text_length = int(args.text_length)
        return cls(model, build_transforms(img_size=img_size, is_train=False),
                   lambda caption: tokenize(caption, tokenizer, text_length=text_length, truncate=True),
                   dev, run_dir=run_dir, checkpoint=ckpt, args=args, batch_size=batch_size,
                   num_workers=num_workers)

    # ---------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentences -> [N, D] float32 L2-normalised CPU embeddings."""
        if isinstance(texts, str):
            raise TypeError("encode_texts expects a list of strings, got a single string")
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = torch.stack([self.tokenize(t) for t in texts[start:start + self.batch_size]])  # [B, L]
            out.append(F.normalize(self.model.encode_text(ids.to(self.device)).float(), dim=-1).cpu())
        if not out:
            raise ValueError("encode_texts got an empty list of sentences")
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, paths: Sequence[str], progress: bool = True) -> Gallery:
        """Image files -> :class:`Gallery`. Files that fail to open are skipped with one warning listing them.

        Raises ValueError when ``paths`` is empty or no file could be read.
        """
        paths = [str(p) for p in paths]
        if not paths:
            raise ValueError("cannot encode an empty gallery: no image paths given")
        loader = torch.utils.data.DataLoader(_ImageFiles(paths, self.transform), batch_size=self.batch_size,
                                             num_workers=self.num_workers, collate_fn=_collate_skip_failed)
        kept, failed, feats = [], [], []
        with tqdm(total=len(paths), desc="encoding images", unit="img", disable=not progress) as bar:
            for idx, imgs, bad in loader:
                failed += bad
                if imgs is not None:
                    f = self.model.encode_image(imgs.to(self.device))  # [B, D]
                    feats.append(F.normalize(f.float(), dim=-1).cpu())
                    kept += idx
                bar.update(len(idx) + len(bad))
        skipped = [paths[i] for i in failed]
        if skipped:
            logger.warning("skipped %d image(s) that could not be opened: %s", len(skipped), ", ".join(skipped))
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
            "img_size": list(getattr(self.args, "img_size", [])) if self.args is not None else None,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def encode_gallery(self, paths: Sequence[str], cache_name: str, cache_dir: str | os.PathLike | None = None,
                       progress: bool = True) -> Gallery:
        """Like :meth:`encode_images`, reusing ``<cache_dir>/<cache_name>.pt`` while its key still matches.

        The key covers every file's path, mtime and size and the checkpoint's, so adding/changing a file or
        loading other weights re-encodes (and overwrites the cache). ``cache_dir`` defaults to
        :meth:`default_cache_dir`; with neither, nothing is cached.
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
            if c is not None and c.get("key") == key:
                logger.info("using cached gallery embeddings %s (%d images)", cache_file, len(c["paths"]))
                if c["skipped"]:
                    logger.warning("skipped %d image(s) that could not be opened: %s", len(c["skipped"]),
                                   ", ".join(c["skipped"]))
                return Gallery(list(c["paths"]), c["embeddings"], list(c["indices"]), list(c["skipped"]))
        gallery = self.encode_images(paths, progress=progress)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": key, "paths": gallery.paths, "embeddings": gallery.embeddings,
                    "indices": gallery.indices, "skipped": gallery.skipped}, tmp)
        os.replace(tmp, cache_file)  # atomic: a concurrent reader sees the old or the new file
        logger.info("cached gallery embeddings in %s", cache_file)
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


# --------------------------------------------------------------------------------------------- test split


def load_test_split(args) -> dict:
    """The run dataset's test dict {image_pids, img_paths, caption_pids, captions} (datasets.build registry)."""
    from datasets.build import build_dataset

    return build_dataset(args.dataset_name, root=args.root_dir, verbose=False).test


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
    name = "test_" + slug(str(getattr(retriever.args, "dataset_name", "dataset")))
    return retriever.encode_gallery(split["img_paths"], name, progress=progress)


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
    scores, indices = retriever.search(captions, gallery.embeddings, topk)  # [Q, k]
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


# --------------------------------------------------------------------------------------------- drawing


def load_font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans when installed, else Pillow's bundled scalable font."""
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_width(font: ImageFont.ImageFont, text: str) -> float:
    """Rendered width of ``text`` in pixels."""
    return font.getlength(text)


def wrap_text(text: str, font: ImageFont.ImageFont, max_width: int) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels; words longer than a line are split. Nothing is dropped."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            while _text_width(font, word) > max_width and len(word) > 1:  # split an over-long word
                cut = max([k for k in range(1, len(word)) if _text_width(font, word[:k]) <= max_width] or [1])
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            candidate = f"{line} {word}" if line else word
            if _text_width(font, candidate) <= max_width:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _fit_label(text: str, font: ImageFont.ImageFont, max_width: int) -> str:
    """Cut a tile label with an ellipsis to fit under the tile (labels only, never the caption)."""
    if _text_width(font, text) <= max_width:
        return text
    while text and _text_width(font, "…" + text) > max_width:
        text = text[1:]  # keep the end: for paths the file name matters most
    return "…" + text


def _line_height(font: ImageFont.ImageFont) -> int:
    """Pixels from one text line to the next."""
    box = font.getbbox("Ayg|")
    return int(box[3] - min(box[1], 0)) + 4


@dataclass
class Tile:
    """One image cell of a grid: the file, the text lines under it, and its frame colour (None: no frame)."""

    path: str | None
    labels: list[str]
    color: tuple[int, int, int] | None


def grid_layout(num_tiles: int, caption_lines: int, tile_size: tuple[int, int] = DEFAULT_TILE_SIZE
                ) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """Canvas size and the outer box (x0, y0, x1, y1), frame included, of every tile.

    Rows: caption (``caption_lines`` lines), then one row of tiles, then ``LABEL_LINES`` label lines.
    """
    tw, th = tile_size
    cap_h = caption_lines * _line_height(load_font(CAPTION_FONT_SIZE))
    lab_h = LABEL_LINES * _line_height(load_font(LABEL_FONT_SIZE))
    cell_w, cell_h = tw + 2 * FRAME, th + 2 * FRAME
    width = 2 * MARGIN + num_tiles * cell_w + max(num_tiles - 1, 0) * TILE_GAP
    y0 = MARGIN + cap_h + MARGIN
    boxes = [(MARGIN + i * (cell_w + TILE_GAP), y0, MARGIN + i * (cell_w + TILE_GAP) + cell_w - 1, y0 + cell_h - 1)
             for i in range(num_tiles)]
    height = y0 + cell_h + 4 + lab_h + MARGIN
    return (width, height), boxes


def _caption_width(num_tiles: int, tile_size: tuple[int, int]) -> int:
    """Width available to the caption: that of the row of tiles."""
    return max(num_tiles, 1) * (tile_size[0] + 2 * FRAME) + max(num_tiles - 1, 0) * TILE_GAP


def _paste_letterboxed(canvas: Image.Image, path: str | None, box: tuple[int, int, int, int]) -> None:
    """Draw the image at ``path`` inside ``box`` keeping its aspect; a grey 'unreadable' cell if it fails."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    cell = Image.new("RGB", (w, h), TILE_BACKGROUND)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
        s = min(w / img.width, h / img.height)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BICUBIC)
        cell.paste(img, ((w - img.width) // 2, (h - img.height) // 2))
    except (OSError, ValueError, TypeError, AttributeError):
        ImageDraw.Draw(cell).text((4, h // 2), "unreadable", fill=TEXT_COLOR, font=load_font(LABEL_FONT_SIZE))
    canvas.paste(cell, (x0, y0))


def caption_layout(caption: str, num_tiles: int, tile_size: tuple[int, int] = DEFAULT_TILE_SIZE
                   ) -> tuple[list[str], tuple[int, int], list[tuple[int, int, int, int]]]:
    """Wrapped caption lines, canvas size and tile boxes of the grid :func:`draw_grid` draws for this caption."""
    lines = wrap_text(caption, load_font(CAPTION_FONT_SIZE), _caption_width(num_tiles, tile_size))
    size, boxes = grid_layout(num_tiles, len(lines), tile_size)
    return lines, size, boxes


def draw_grid(caption: str, tiles: Sequence[Tile], tile_size: tuple[int, int] = DEFAULT_TILE_SIZE) -> Image.Image:
    """A row of framed image tiles with labels under each, under the caption wrapped to the grid width."""
    cap_font, lab_font = load_font(CAPTION_FONT_SIZE), load_font(LABEL_FONT_SIZE)
    lines, (width, height), boxes = caption_layout(caption, len(tiles), tile_size)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    lh = _line_height(cap_font)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * lh), line, fill=TEXT_COLOR, font=cap_font)
    llh = _line_height(lab_font)
    for tile, (x0, y0, x1, y1) in zip(tiles, boxes):
        if tile.color is not None:
            draw.rectangle((x0, y0, x1, y1), fill=tile.color)
        _paste_letterboxed(canvas, tile.path, (x0 + FRAME, y0 + FRAME, x1 - FRAME, y1 - FRAME))
        for j, label in enumerate(tile.labels[:LABEL_LINES]):
            draw.text((x0, y1 + 4 + j * llh), _fit_label(label, lab_font, x1 - x0 + 1), fill=TEXT_COLOR,
                      font=lab_font)
    return canvas


def draw_query_grid(result: QueryResult, tile_size: tuple[int, int] = DEFAULT_TILE_SIZE) -> Image.Image:
    """Test query: ground truth (blue) then the top-k, green when the identity matches, red otherwise."""
    tiles = [Tile(result.gt_path, ["ground truth", f"pid {result.pid}"], GT_COLOR)]
    for r, (path, pid, score) in enumerate(zip(result.paths, result.pids, result.scores), start=1):
        tiles.append(Tile(path, [f"#{r}  sim {score:.3f}", f"pid {pid}"],
                          MATCH_COLOR if pid == result.pid else MISMATCH_COLOR))
    return draw_grid(query_title(result), tiles, tile_size)


def query_title(result: QueryResult) -> str:
    """The caption line of a test-query grid."""
    return f"[query {result.index}, pid {result.pid}] {result.caption}"


def draw_search_grid(query: str, paths: Sequence[str], scores: Sequence[float] | torch.Tensor,
                     tile_size: tuple[int, int] = DEFAULT_TILE_SIZE) -> Image.Image:
    """Free-text search: the top-k in rank order, neutral frames (no identities), rank/score/file name under."""
    scores = scores.tolist() if isinstance(scores, torch.Tensor) else list(scores)
    tiles = [Tile(p, [f"#{r}  sim {s:.3f}", Path(p).name], NEUTRAL_COLOR)
             for r, (p, s) in enumerate(zip(paths, scores), start=1)]
    return draw_grid(query, tiles, tile_size)


def tile_size_for(args, width: int = DEFAULT_TILE_SIZE[0], max_height: int = 2 * DEFAULT_TILE_SIZE[1]
                  ) -> tuple[int, int]:
    """Tile size with the run's aspect (img_size = (H, W)) at ``width`` px, or the default without a run."""
    size = getattr(args, "img_size", None)
    if not size:
        return DEFAULT_TILE_SIZE
    h, w = (int(s) for s in size)
    return width, min(max_height, round(width * h / w))


def slug(text: str, max_len: int = 40) -> str:
    """File-name-safe short form of a sentence."""
    s = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return textwrap.shorten(" ".join(s.split("_")), max_len, placeholder="").replace(" ", "_") or "query"
