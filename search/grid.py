"""PIL drawing of retrieval result grids: a caption on top, then a row of framed image tiles with labels under each.

Pure drawing: no model, no dataset. ``search/split_queries.py`` turns a ranked test query into tiles
(:func:`search.split_queries.draw_query_grid`); :func:`draw_search_grid` draws a free-text search.
Frames are solid colours, so a test can read them back from the saved PNG.
"""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from utils.iotools import open_image

# Grid colours (RGB).
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
MAX_CAPTION_LINES = 8            # a longer caption is cut, its last line ending with ELLIPSIS
ELLIPSIS = "…"
# Grids that would overwrite an existing file are saved as <stem>_1.png, <stem>_2.png, ... (at most this many tries).
MAX_NAME_TRIES = 10000


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


def cap_lines(lines: Sequence[str], font: ImageFont.ImageFont, max_width: int,
              max_lines: int = MAX_CAPTION_LINES) -> list[str]:
    """At most ``max_lines`` lines; when some are dropped the last kept line ends with an ellipsis (within width)."""
    if len(lines) <= max_lines:
        return list(lines)
    kept = list(lines[:max_lines])
    last = kept[-1].rstrip()
    while last and _text_width(font, last + ELLIPSIS) > max_width:
        last = last[:-1].rstrip()
    kept[-1] = last + ELLIPSIS
    return kept


def printable(text: str) -> str:
    """``text`` with each control character (newline, tab, ...) written as its escape, e.g. ``a\\nb.jpg``."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _fit_label(text: str, font: ImageFont.ImageFont, max_width: int) -> str:
    """Cut a tile label with an ellipsis to fit under the tile (labels only, never the caption). Control
    characters (a newline in a file name) are shown escaped (``\\n``): one label is one line."""
    text = printable(text)
    if _text_width(font, text) <= max_width:
        return text
    while text and _text_width(font, ELLIPSIS + text) > max_width:
        text = text[1:]  # keep the end: for paths the file name matters most
    return ELLIPSIS + text


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
        img = open_image(path)  # EXIF orientation and 16-bit images as everywhere else
        s = min(w / img.width, h / img.height)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BICUBIC)
        cell.paste(img, ((w - img.width) // 2, (h - img.height) // 2))
    except (OSError, ValueError, TypeError, AttributeError):
        ImageDraw.Draw(cell).text((4, h // 2), "unreadable", fill=TEXT_COLOR, font=load_font(LABEL_FONT_SIZE))
    canvas.paste(cell, (x0, y0))


def caption_layout(caption: str, num_tiles: int, tile_size: tuple[int, int] = DEFAULT_TILE_SIZE
                   ) -> tuple[list[str], tuple[int, int], list[tuple[int, int, int, int]]]:
    """Caption lines (wrapped, at most ``MAX_CAPTION_LINES``), canvas size and tile boxes of :func:`draw_grid`."""
    font, width = load_font(CAPTION_FONT_SIZE), _caption_width(num_tiles, tile_size)
    lines = cap_lines(wrap_text(caption, font, width), font, width)
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


def draw_search_grid(query: str, paths: Sequence[str], scores: Sequence[float] | torch.Tensor,
                     tile_size: tuple[int, int] = DEFAULT_TILE_SIZE) -> Image.Image:
    """Free-text search: the top-k in rank order, neutral frames (no identities), rank/score/file name under."""
    scores = scores.tolist() if isinstance(scores, torch.Tensor) else list(scores)
    tiles = [Tile(p, [f"#{r}  sim {s:.3f}", Path(p).name], NEUTRAL_COLOR)
             for r, (p, s) in enumerate(zip(paths, scores), start=1)]
    return draw_grid(query, tiles, tile_size)


def tile_size_for(args, width: int = DEFAULT_TILE_SIZE[0], max_height: int = 2 * DEFAULT_TILE_SIZE[1]
                  ) -> tuple[int, int]:
    """Tile size with the run's aspect (``args.img_size`` = (H, W)) at ``width`` px; the default when args is None."""
    if args is None:
        return DEFAULT_TILE_SIZE
    h, w = (int(s) for s in args.img_size)
    return width, min(max_height, round(width * h / w))


def slug(text: str, max_len: int = 40) -> str:
    """File-name-safe short form of a sentence."""
    s = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return textwrap.shorten(" ".join(s.split("_")), max_len, placeholder="").replace(" ", "_") or "query"


def save_new_png(img: Image.Image, path: str | os.PathLike) -> Path:
    """Save ``img`` as PNG at ``path``, or at ``<stem>_1.png``, ``<stem>_2.png``... when that file exists.

    Files are created exclusively, so an earlier grid (or any other file) is never overwritten. Returns the path used.
    """
    path = Path(path)
    for k in range(MAX_NAME_TRIES):
        target = path if k == 0 else path.with_name(f"{path.stem}_{k}{path.suffix}")
        try:
            f = open(target, "xb")
        except FileExistsError:
            continue
        try:
            with f:
                img.save(f, format="PNG")
        except BaseException:
            target.unlink(missing_ok=True)  # the file is ours (created above): no half-written grid is left
            raise
        return target
    raise FileExistsError(f"{str(path)!r} and {MAX_NAME_TRIES - 1} numbered variants of it already exist; "
                          f"choose another --out folder")
