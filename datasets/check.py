"""Image-file checks (a library: no command line, no import of ``datasets.build``; the report is
``python -m tools.check_dataset``).

One check, at three levels: ``exists`` (stat only: missing / not a file / zero bytes; raises
:class:`ImageFilesMissingError`, also a ``FileNotFoundError``), ``verify`` (+ header and structure) and ``load``
(+ every pixel); both of the latter raise :class:`ImageCheckError`. The ``exists`` level runs whenever a dataset is
built, even under ``--skip_image_check`` (:func:`check_image_files`, also ``datasets.bases.check_image_files``).

Pre-training check (called before the loaders are built)::

    check_dataset_images(dataset, splits=("train", "test", "val"))   # raises ImageCheckError, a ValueError

opens every unique image of the given splits with a header check (``PIL.Image.open`` + ``verify()``) and raises one
error naming every bad file (missing / zero bytes / unreadable: reason). Files that passed are remembered in
``<dataset_dir>/.irra_image_check/verified.json`` by (size, mtime), so a later run with unchanged files opens none.
``verify_images(paths, cache_dir=...)`` is the same for a plain list of paths. ``verify()`` checks the file's
structure, not the pixel data: a JPEG cut short after its headers passes it; ``level="load"`` decodes every image
(about 10x slower on the first run, the cache makes later runs free).

Dataset report: ``python -m tools.check_dataset --dataset_name CUHK-PEDES --root_dir data`` (tools/check_dataset.py).
"""
from __future__ import annotations

import json
import logging
import os
import os.path as op
import stat
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from PIL import Image
from tqdm import tqdm

from utils.run_dir import atomic_write, read_json

logger = logging.getLogger("IRRA.dataset.check")

# Folder under the dataset folder that holds the pre-training check's cache.
IMAGE_CHECK_DIR = ".irra_image_check"
IMAGE_CHECK_FILE = "verified.json"
CACHE_VERSION = 1
# How many bad files an error / the report names (the rest are counted).
MAX_BAD_SHOWN = 20
# Images with more pixels than this (4096 x 4096) are reported as huge (a warning naming them): each read decodes all
# of them, so one 144-Mpx image slows a whole training down. PIL refuses files above 2 * Image.MAX_IMAGE_PIXELS
# (about 179 Mpx) outright (DecompressionBombError: reported as unreadable).
HUGE_IMAGE_PIXELS = 4096 * 4096
# The splits a parsed dataset has (BaseDataset.train / .test / .val).
SPLITS = ("train", "test", "val")

MISSING, ZERO_BYTES, UNREADABLE = "missing", "zero bytes", "unreadable"
# Check levels: EXISTS only stats the file, VERIFY also reads the header and checks the file's structure, LOAD
# decodes every pixel.
EXISTS, VERIFY, LOAD = "exists", "verify", "load"
LEVELS = (EXISTS, VERIFY, LOAD)

SKIP_HINT = "pass --skip_image_check to turn this check off"
EXISTS_HINT = "check --root_dir and the dataset's imgs/ folder (this check runs even with --skip_image_check)"


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


class ImageFilesMissingError(ImageCheckError, FileNotFoundError):
    """The ``exists`` level found image files that are missing, not files, or empty (no file was opened)."""

    def __init__(self, problems: Sequence[ImageProblem], total: int, what: str = "dataset") -> None:
        super().__init__(problems, total, what, EXISTS_HINT)


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
    """Open ``path`` with PIL at ``level`` (``verify`` or ``load``); returns ``(width, height)`` or the problem."""
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
    if level == EXISTS:
        raise ValueError("scan_images opens the files: level 'verify' or 'load'")
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
        data = read_json(cache_file, "image check cache")
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
    try:
        os.makedirs(op.dirname(cache_file), exist_ok=True)
        atomic_write(cache_file, json.dumps({"version": CACHE_VERSION, "files": files}, separators=(",", ":")))
    except OSError as err:
        logger.debug("image check cache not written to '%s': %s", cache_file, err)


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
        level: ``"exists"`` (stat only, no file opened, no cache), ``"verify"`` (header + ``Image.verify()``; misses
            JPEGs cut short after their headers) or ``"load"`` (decode every pixel). A file cached at ``"load"``
            counts for ``"verify"``, not the reverse.
        what: names the file set in the error ("train set", "CUHK-PEDES train/test/val", ...).

    Returns:
        ``ImageCheckSummary(total, opened, cached)``.

    Raises:
        ImageCheckError: naming every bad file (the first ``MAX_BAD_SHOWN``, then a count) with what is wrong;
            :class:`ImageFilesMissingError` at the ``exists`` level.
    """
    _check_level(level)
    unique = list(dict.fromkeys(paths))
    if level == EXISTS:
        problems_found = [p for p in (_stat(path)[1] for path in unique) if p is not None]
        if problems_found:
            raise ImageFilesMissingError(problems_found, len(unique), what)
        return ImageCheckSummary(len(unique), 0, 0)
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


def check_image_files(img_paths: Sequence[str], what: str = "dataset") -> None:
    """The ``exists`` level of the image check (stat only, every file named): raise one
    :class:`ImageFilesMissingError` (a ``FileNotFoundError``) if an image file is missing, not a file or empty.
    Runs whenever a dataset is built, even under ``--skip_image_check``."""
    verify_images(img_paths, show_progress=False, level=EXISTS, what=what)


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


if __name__ == "__main__":  # the entry point before tools/check_dataset.py: say where it went, check nothing, fail
    import shlex
    import sys

    sys.exit("python -m datasets.check: nothing was checked; the dataset report moved to tools/check_dataset.py "
             "(the same options). Run:\n  " + shlex.join(["python", "-m", "tools.check_dataset", *sys.argv[1:]]))
