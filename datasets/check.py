"""Image-file checks: the pre-training check (``check_dataset_images``) and ``python -m datasets.check``.

Pre-training check (called before the loaders are built)::

    check_dataset_images(dataset, splits=("train", "test", "val"))   # raises ImageCheckError, a ValueError

opens every unique image of the given splits with a header check (``PIL.Image.open`` + ``verify()``) and raises one
error naming every bad file (missing / zero bytes / unreadable: reason). Files that passed are remembered in
``<dataset_dir>/.irra_image_check/verified.json`` by (size, mtime), so a later run with unchanged files opens none.
``verify_images(paths, cache_dir=...)`` is the same for a plain list of paths. ``verify()`` checks the file's
structure, not the pixel data: a JPEG cut short after its headers passes it; ``level="load"`` decodes every image
(about 10x slower on the first run, the cache makes later runs free).

Dataset report::

    python -m datasets.check --dataset_name CUHK-PEDES --root_dir data [--text_length 77]

parses the annotation, fully decodes every image, names missing / zero-byte / unreadable images (exit code 1) and
warns about tiny and huge (over ``HUGE_IMAGE_PIXELS``) images, duplicate image paths, identities in two splits; prints
per-split counts, the caption length distribution in BPE tokens and how many captions ``--text_length`` cuts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import os.path as op
import stat
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger("IRRA.dataset.check")

# Folder under the dataset folder that holds the pre-training check's cache.
IMAGE_CHECK_DIR = ".irra_image_check"
IMAGE_CHECK_FILE = "verified.json"
CACHE_VERSION = 1
# How many bad files an error / the report names (the rest are counted).
MAX_BAD_SHOWN = 20
# Images smaller than this on a side are reported as tiny (a warning).
TINY_IMAGE_SIDE = 16
# Images with more pixels than this (4096 x 4096) are reported as huge (a warning naming them): each read decodes all
# of them, so one 144-Mpx image slows a whole training down. PIL refuses files above 2 * Image.MAX_IMAGE_PIXELS
# (about 179 Mpx) outright (DecompressionBombError: reported as unreadable).
HUGE_IMAGE_PIXELS = 4096 * 4096
# Caption-length histogram: number of bins and the width of the longest bar in characters.
HIST_BINS = 10
HIST_BAR_WIDTH = 40
# The splits a parsed dataset has (BaseDataset.train / .test / .val).
SPLITS = ("train", "test", "val")

MISSING, ZERO_BYTES, UNREADABLE = "missing", "zero bytes", "unreadable"
# Check levels: VERIFY reads the header and checks the file's structure, LOAD decodes every pixel.
VERIFY, LOAD = "verify", "load"
LEVELS = (VERIFY, LOAD)

SKIP_HINT = "pass --skip_image_check to turn this check off"


@dataclass(frozen=True)
class ImageProblem:
    """One image file that cannot be used: ``kind`` is ``missing``, ``zero bytes`` or ``unreadable``."""

    path: str
    kind: str
    reason: str = ""

    def describe(self) -> str:
        return f"{self.path}: {self.kind}" + (f": {self.reason}" if self.reason else "")


class ImageScan(NamedTuple):
    """What ``scan_images`` found: the bad files (in input order) and ``(width, height)`` of every opened good one."""

    problems: List[ImageProblem]
    sizes: Dict[str, Tuple[int, int]]


class ImageCheckSummary(NamedTuple):
    """Result of a successful ``verify_images``: unique files, files opened, files skipped thanks to the cache."""

    total: int
    opened: int
    cached: int


class ImageCheckError(ValueError):
    """Some image files are missing, empty or unreadable; ``problems`` lists all of them."""

    def __init__(self, problems: Sequence[ImageProblem], total: int, what: str = "dataset",
                 hint: str = SKIP_HINT) -> None:
        self.problems = list(problems)
        self.total = total
        super().__init__(f"{len(self.problems)} of {total} image files of the {what} cannot be read:\n"
                         f"{format_problems(self.problems)}\n"
                         f"Fix or remove these files (or their annotation entries), or {hint}.")


def format_problems_text(lines: Sequence[str], max_shown: int = MAX_BAD_SHOWN, indent: str = "  ") -> str:
    """One indented line per item, at most ``max_shown`` (0: all), then ``... and N more``."""
    shown = lines if max_shown <= 0 else lines[:max_shown]
    out = [indent + line for line in shown]
    if len(lines) > len(shown):
        out.append(f"{indent}... and {len(lines) - len(shown)} more")
    return "\n".join(out)


def format_problems(problems: Sequence[ImageProblem], max_shown: int = MAX_BAD_SHOWN, indent: str = "  ") -> str:
    """One line per problem, at most ``max_shown`` (0: all), then ``... and N more``."""
    shown = problems if max_shown <= 0 else problems[:max_shown]
    lines = [indent + p.describe() for p in shown]
    if len(problems) > len(shown):
        lines.append(f"{indent}... and {len(problems) - len(shown)} more")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- core
def _stat(path: str) -> Tuple[Optional[os.stat_result], Optional[ImageProblem]]:
    """``os.stat`` of a regular file, or the problem (missing / not a file / zero bytes)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, ImageProblem(path, MISSING)
    except OSError as err:
        return None, ImageProblem(path, UNREADABLE, f"{type(err).__name__}: {err.strerror or err}")
    if not stat.S_ISREG(st.st_mode):
        return None, ImageProblem(path, UNREADABLE, "not a regular file")
    if st.st_size == 0:
        return None, ImageProblem(path, ZERO_BYTES)
    return st, None


def _open(path: str, level: str) -> Tuple[Optional[Tuple[int, int]], Optional[ImageProblem]]:
    """Open ``path`` with PIL at ``level``; returns ``(width, height)`` or the problem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # names no file: we report huge ones
            with Image.open(path) as img:
                size = img.size
                if level == LOAD:
                    img.load()
                else:
                    img.verify()
        return size, None
    except Exception as err:  # noqa: BLE001 - any failure to read the file makes it unusable; the reason is kept
        return None, ImageProblem(path, UNREADABLE, f"{type(err).__name__}: {err}")


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"Unknown image check level '{level}'; valid: {list(LEVELS)}")


def scan_images(paths: Iterable[str], level: str = LOAD, show_progress: bool = True,
                desc: str = "Checking images") -> ImageScan:
    """Check every unique path of ``paths`` (no cache): stat, then open with PIL at ``level``.

    Args:
        paths: image file paths (duplicates are checked once).
        level: ``"load"`` decodes every pixel (catches truncated data); ``"verify"`` reads the header and runs
            ``Image.verify()`` (faster).
        show_progress: show a tqdm progress bar.
        desc: the progress bar's label.
    """
    _check_level(level)
    unique = list(dict.fromkeys(paths))
    problems: List[ImageProblem] = []
    sizes: Dict[str, Tuple[int, int]] = {}
    for path in tqdm(unique, desc=desc, disable=not show_progress, leave=False, unit="img"):
        _, problem = _stat(path)
        if problem is None:
            size, problem = _open(path, level)
        if problem is not None:
            problems.append(problem)
        else:
            sizes[path] = size
    return ImageScan(problems, sizes)


# ---------------------------------------------------------------------------------------------------- cache
def _cache_key(path: str) -> str:
    return op.abspath(path)


def _read_cache(cache_file: str) -> Dict[str, list]:
    """``{abspath: [size, mtime_ns, level]}`` from ``cache_file``; anything unreadable is an empty cache."""
    try:
        with open(cache_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        logger.debug("image check cache '%s' is not readable (%s); checking all files", cache_file, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        logger.debug("image check cache '%s' has another format; checking all files", cache_file)
        return {}
    return data["files"]


def _write_cache(cache_file: str, files: Dict[str, list]) -> None:
    """Write the cache atomically (temp file + rename); a folder that is not writable only logs at debug level."""
    cache_dir = op.dirname(cache_file)
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=IMAGE_CHECK_FILE + ".", suffix=".tmp", dir=cache_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "files": files}, f, separators=(",", ":"))
        os.replace(tmp, cache_file)
        tmp = None
    except OSError as err:
        logger.debug("image check cache not written to '%s': %s", cache_file, err)
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass


def _cache_hit(entry: Optional[list], st: os.stat_result, level: str) -> bool:
    if not isinstance(entry, list) or len(entry) not in (3, 4):  # [size, mtime_ns, level(, pixels)]
        return False
    size, mtime_ns, cached_level = entry[:3]
    return (size == st.st_size and mtime_ns == st.st_mtime_ns and cached_level in LEVELS
            and LEVELS.index(cached_level) >= LEVELS.index(level))


def verify_images(paths: Iterable[str], cache_dir: Optional[str] = None, show_progress: bool = True,
                  level: str = VERIFY, what: str = "dataset") -> ImageCheckSummary:
    """Check that every image of ``paths`` exists, is not empty and opens; raise one ``ImageCheckError`` if not.

    Args:
        paths: image file paths (duplicates are checked once).
        cache_dir: folder for ``verified.json``, which records the (size, mtime) of files that passed; a file with
            the same size and mtime as recorded is not opened again. ``None``: no cache. A folder that cannot be
            created or written is skipped (debug log).
        show_progress: show a tqdm progress bar over the files that are opened.
        level: ``"verify"`` (header + ``Image.verify()``; misses JPEGs cut short after their headers) or ``"load"``
            (decode every pixel). A file cached at ``"load"`` counts for ``"verify"``, not the reverse.
        what: names the file set in the error ("train set", "CUHK-PEDES train/test/val", ...).

    Returns:
        ``ImageCheckSummary(total, opened, cached)``.

    Raises:
        ImageCheckError: naming every bad file (the first ``MAX_BAD_SHOWN``, then a count) with what is wrong.
    """
    _check_level(level)
    unique = list(dict.fromkeys(paths))
    cache_file = op.join(cache_dir, IMAGE_CHECK_FILE) if cache_dir else None
    cache = _read_cache(cache_file) if cache_file else {}
    problems: Dict[str, ImageProblem] = {}
    to_open: List[Tuple[str, os.stat_result]] = []
    n_cached = 0
    huge: List[str] = []
    for path in unique:
        st, problem = _stat(path)
        if problem is not None:
            problems[path] = problem
        elif _cache_hit(cache.get(_cache_key(path)), st, level):
            n_cached += 1
            entry = cache[_cache_key(path)]
            if len(entry) == 4 and isinstance(entry[3], int) and entry[3] > HUGE_IMAGE_PIXELS:
                huge.append(f"{path}: {entry[3] / 1e6:.1f} Mpx")
        else:
            to_open.append((path, st))
    verified = 0
    for path, st in tqdm(to_open, desc=f"Checking images ({what})", disable=not show_progress or not to_open,
                         leave=False, unit="img"):
        size, problem = _open(path, level)
        if problem is not None:
            problems[path] = problem
        else:
            cache[_cache_key(path)] = [st.st_size, st.st_mtime_ns, level, size[0] * size[1]]
            verified += 1
            if size[0] * size[1] > HUGE_IMAGE_PIXELS:
                huge.append(f"{path}: {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} Mpx)")
    if huge:
        logger.warning("%d images of the %s are huge (over %.1f Mpx, HUGE_IMAGE_PIXELS); each read decodes every "
                       "pixel, which slows loading down; downscale them:\n%s", len(huge), what,
                       HUGE_IMAGE_PIXELS / 1e6, format_problems_text(huge))
    if cache_file and verified:
        _write_cache(cache_file, cache)
    if problems:
        raise ImageCheckError([problems[p] for p in unique if p in problems], len(unique), what)
    logger.info("image check (%s): %d files, %d opened, %d unchanged since their last check", what, len(unique),
                len(to_open), n_cached)
    return ImageCheckSummary(len(unique), len(to_open), n_cached)


def split_image_paths(dataset, split: str) -> List[str]:
    """Image paths of one split of a parsed dataset, one per annotation entry (file order).

    ``train`` rows repeat the path per caption; entries are told apart by ``image_id``.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split '{split}'; valid: {list(SPLITS)}")
    if split == "train":
        return list({image_id: path for _, image_id, path, _ in dataset.train}.values())
    return list(getattr(dataset, split)["img_paths"])


def dataset_cache_dir(dataset) -> str:
    """``<dataset_dir>/.irra_image_check``: where ``check_dataset_images`` keeps its cache by default."""
    return op.join(dataset.dataset_dir, IMAGE_CHECK_DIR)


def check_dataset_images(dataset, splits: Sequence[str] = SPLITS, cache_dir: Optional[str] = None,
                         show_progress: bool = True, level: str = VERIFY) -> ImageCheckSummary:
    """``verify_images`` over the unique image paths of ``splits`` of a parsed dataset (``datasets.bases.BaseDataset``).

    Args:
        dataset: a parsed dataset (``.train`` rows ``(pid, image_id, img_path, caption)``, ``.test`` / ``.val``
            dicts with ``img_paths``, ``.dataset_dir``).
        splits: which of ``train``, ``test``, ``val`` to check.
        cache_dir: the cache folder; ``None``: ``<dataset_dir>/.irra_image_check``.
        show_progress: show a tqdm progress bar.
        level: ``"verify"`` or ``"load"`` (see ``verify_images``).

    Raises:
        ImageCheckError: see ``verify_images``.
    """
    splits = list(dict.fromkeys(splits))
    paths = [p for split in splits for p in split_image_paths(dataset, split)]
    name = dataset.display_name or type(dataset).__name__
    return verify_images(paths, cache_dir=cache_dir if cache_dir is not None else dataset_cache_dir(dataset),
                         show_progress=show_progress, level=level, what=f"{name} {'/'.join(splits)}")


# ---------------------------------------------------------------------------------------------------- report
EXIT_OK, EXIT_BAD_IMAGES, EXIT_BAD_DATASET = 0, 1, 2


def caption_token_lengths(captions: Sequence[str], show_progress: bool = True) -> List[int]:
    """Length in BPE tokens of each caption, SOT and EOT included (what ``tokenize`` fills before cutting)."""
    from utils.simple_tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    lengths: Dict[str, int] = {}
    for c in tqdm(list(dict.fromkeys(captions)), desc="Tokenizing captions", disable=not show_progress, leave=False):
        lengths[c] = len(tokenizer.encode(c)) + 2  # + SOT + EOT
    return [lengths[c] for c in captions]


def length_histogram(lengths: Sequence[int], bins: int = HIST_BINS, bar_width: int = HIST_BAR_WIDTH) -> List[str]:
    """Text histogram of integer lengths: at most ``bins`` equal integer ranges, ``lo-hi | ### count``."""
    lo, hi = min(lengths), max(lengths)
    step = -(-(hi - lo + 1) // bins)  # ceil: every bin covers the same number of integer lengths
    counts = Counter((n - lo) // step for n in lengths)
    n_bins = (hi - lo) // step + 1
    top = max(counts.values())
    label_w = len(f"{lo + (n_bins - 1) * step}-{lo + n_bins * step - 1}")
    lines = []
    for b in range(n_bins):
        start, end = lo + b * step, lo + (b + 1) * step - 1
        label = str(start) if step == 1 else f"{start}-{end}"
        bar = "#" * int(round(bar_width * counts.get(b, 0) / top))
        lines.append(f"{label:>{label_w}} | {bar} {counts.get(b, 0)}")
    return lines


def _entries(dataset, split: str) -> Tuple[List[int], List[str], List[str]]:
    """Raw annotation ids (one per image), image paths and captions of a split."""
    if split == "train":
        offset = dataset.train_pid_offset
        by_image = {image_id: (pid + offset, path) for pid, image_id, path, _ in dataset.train}
        return ([pid for pid, _ in by_image.values()], [path for _, path in by_image.values()],
                [row[3] for row in dataset.train])
    d = getattr(dataset, split)
    return list(d["image_pids"]), list(d["img_paths"]), list(d["captions"])


def _print_list(items: Sequence[str], max_shown: int, indent: str = "    ") -> None:
    shown = items if max_shown <= 0 else items[:max_shown]
    for item in shown:
        print(indent + item)
    if len(items) > len(shown):
        print(f"{indent}... and {len(items) - len(shown)} more")


def report(dataset, text_length: int = 77, max_shown: int = MAX_BAD_SHOWN, show_progress: bool = True) -> int:
    """Print the dataset report (see the module docstring) for a parsed dataset; returns the exit code."""
    splits = {s: _entries(dataset, s) for s in SPLITS}

    print("Splits:")
    for s, (ids, paths, captions) in splits.items():
        print(f"  {s}: {len(set(ids))} ids, {len(paths)} images, {len(captions)} captions")

    all_paths = [p for _, paths, _ in splits.values() for p in paths]
    scan = scan_images(all_paths, level=LOAD, show_progress=show_progress)
    n_unique = len(dict.fromkeys(all_paths))
    print(f"Images: {n_unique} files")
    if scan.problems:
        print(f"  ERROR: {len(scan.problems)} image files are missing, empty or unreadable:")
        _print_list([p.describe() for p in scan.problems], max_shown)
    tiny = [f"{p}: {w}x{h}" for p, (w, h) in scan.sizes.items() if w < TINY_IMAGE_SIDE or h < TINY_IMAGE_SIDE]
    if tiny:
        print(f"  WARNING: {len(tiny)} images are tiny (under {TINY_IMAGE_SIDE} px on a side, width x height):")
        _print_list(tiny, max_shown)
    huge = [f"{p}: {w}x{h} ({w * h / 1e6:.1f} Mpx)" for p, (w, h) in scan.sizes.items() if w * h > HUGE_IMAGE_PIXELS]
    if huge:
        print(f"  WARNING: {len(huge)} images are huge (over {HUGE_IMAGE_PIXELS / 1e6:.1f} Mpx; every read decodes "
              f"all of them, which slows training down: downscale them):")
        _print_list(huge, max_shown)

    for s, (_, paths, _) in splits.items():
        dup = [f"{p} ({n} times)" for p, n in Counter(paths).items() if n > 1]
        if dup:
            print(f"  WARNING: {len(dup)} image paths are listed more than once in {s}:")
            _print_list(dup, max_shown)
    where_path: Dict[str, List[str]] = {}
    where_id: Dict[int, List[str]] = {}
    for s, (ids, paths, _) in splits.items():
        for p in dict.fromkeys(paths):
            where_path.setdefault(p, []).append(s)
        for i in dict.fromkeys(ids):
            where_id.setdefault(i, []).append(s)
    cross_paths = [f"{p} ({', '.join(ss)})" for p, ss in where_path.items() if len(ss) > 1]
    if cross_paths:
        print(f"  WARNING: {len(cross_paths)} image paths are in more than one split:")
        _print_list(cross_paths, max_shown)
    cross_ids = [f"id {i} ({', '.join(ss)})" for i, ss in where_id.items() if len(ss) > 1]
    if cross_ids:
        print(f"  WARNING: {len(cross_ids)} identities (annotation ids) are in more than one split:")
        _print_list(cross_ids, max_shown)

    all_captions = [c for _, _, captions in splits.values() for c in captions]
    if all_captions:
        lengths = caption_token_lengths(all_captions, show_progress=show_progress)
        arr = np.asarray(lengths)
        print(f"Caption lengths in BPE tokens (with SOT/EOT), {len(lengths)} captions:")
        print(f"  min {arr.min()}  median {np.median(arr):g}  p95 {np.percentile(arr, 95):g}  max {arr.max()}")
        for line in length_histogram(lengths):
            print("  " + line)
        per_split, start = [], 0
        for s, (_, _, captions) in splits.items():
            per_split.append(f"{s} {int((arr[start:start + len(captions)] > text_length).sum())}")
            start += len(captions)
        print(f"  --text_length {text_length} cuts {int((arr > text_length).sum())} of {len(lengths)} captions "
              f"({', '.join(per_split)})")

    if scan.problems:
        print(f"FAILED: {len(scan.problems)} of {n_unique} image files cannot be read.")
        return EXIT_BAD_IMAGES
    print("OK")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m datasets.check``: parse a dataset and print the report; returns the exit code
    (0 fine or warnings only, 1 missing / empty / unreadable images, 2 the dataset cannot be parsed)."""
    parser = argparse.ArgumentParser(
        prog="python -m datasets.check",
        description="Check a text-to-person dataset: annotation, every image file, duplicates, caption lengths.")
    parser.add_argument("--dataset_name", default="CUHK-PEDES", help="[CUHK-PEDES, ICFG-PEDES, RSTPReid, SynthPEDES]")
    parser.add_argument("--root_dir", default="./data", help="folder that holds the dataset folder")
    parser.add_argument("--text_length", type=int, default=77, help="report how many captions this length cuts")
    parser.add_argument("--max_shown", type=int, default=MAX_BAD_SHOWN, help="files listed per finding (0: all)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from datasets.build import build_dataset  # here: datasets.build may import this module

    try:
        dataset = build_dataset(args.dataset_name, root=args.root_dir, verbose=False)
    except (OSError, ValueError) as err:  # FileNotFoundError, DatasetFormatError, malformed json, unknown name
        print(f"error: cannot parse {args.dataset_name} under '{args.root_dir}':\n{err}", file=sys.stderr)
        return EXIT_BAD_DATASET
    print(f"{args.dataset_name}: {dataset.anno_path}")
    return report(dataset, text_length=args.text_length, max_shown=args.max_shown,
                  show_progress=not args.no_progress)


if __name__ == "__main__":
    from utils.cli import run_main

    run_main(main, prog="python -m datasets.check")
