"""Small I/O helpers: images, json, directories and the run's configs.yaml (files read and written through
``utils/run_dir.py``'s careful reader and ``atomic_write``).

``load_train_configs`` reads both our configs.yaml (plain YAML, tuples written as lists) and the ORIGINAL IRRA's,
which ``yaml.dump`` wrote with ``!!python/tuple [384, 128]`` tags. Only that one python tag is accepted; any other
``!!python/...`` tag raises a clear error instead of constructing arbitrary objects.
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import os
import os.path as osp
import time
from typing import TYPE_CHECKING, Any

import yaml

from utils.run_dir import CONFIG_FILE, FileReadError, atomic_write, read_text
from utils.run_dir import read_json as _read_json

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger("IRRA.iotools")

CONFIG_FILE_NAME = CONFIG_FILE  # the original's spelling of the name
# Options that are tuples in args (utils/options.py); lists read from YAML are turned back into tuples.
TUPLE_OPTIONS = ("img_size", "milestones")


# EXIF tag of the orientation a camera recorded (1 = upright; 2..8 = mirrored and / or rotated).
EXIF_ORIENTATION = 0x0112
# Modes whose pixels are wider than 8 bits: PIL's convert("RGB") clips them at 255 (16-bit images turn white).
WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def open_image(img_path: str) -> "Image.Image":
    """Open ``img_path`` as an RGB PIL image in one try (no retry, no logging): errors reach the caller.

    Every image read of the project comes here (training, evaluation, gallery search, grids):
    - the EXIF orientation of phone photos is applied (an image without one, as every benchmark image, is unchanged);
    - 16-bit and 32-bit images (modes ``I;16``, ``I``, ``F``) are scaled by their range, see :func:`to_rgb`;
    - every other mode PIL opens (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, LAB, ...) is ``convert("RGB")``, as the
      original (alpha dropped).
    """
    from PIL import Image, ImageOps  # here, not at the top: reading configs (tools.summarize) needs no PIL

    with Image.open(img_path) as img:
        if img.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1):
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def to_rgb(img: "Image.Image") -> "Image.Image":
    """``img`` as 8-bit RGB. Wide modes are scaled by their range instead of clipped at 255: 16-bit integers
    (``I;16*``, and ``I`` holding values up to 65535) by 255 / 65535, ``I`` with larger or negative values and ``F``
    beyond [0, 255] from their own min..max, ``F`` within [0, 1] by 255; ``I`` / ``F`` already within [0, 255] as
    they are."""
    if img.mode not in WIDE_MODES:
        return img.convert("RGB")
    import numpy as np
    from PIL import Image

    arr = np.asarray(img, dtype=np.float64)  # [H, W]
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and hi > 255 and lo >= 0 and hi <= 65535):
        arr = arr * (255.0 / 65535.0)
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        arr = arr * 255.0
    elif lo < 0 or hi > 255:  # no known range: stretch what is there
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def read_image(img_path: str, retries: int = 3, retry_delay: float = 0.1) -> "Image.Image":
    """Open ``img_path`` as an RGB PIL image.

    Transient ``OSError`` (e.g. network file systems under load) is retried ``retries`` times in total, sleeping
    ``retry_delay`` seconds in between; then an ``OSError`` naming the file is raised. A file that does not exist
    raises ``FileNotFoundError`` at once (the original looped forever in both cases).
    """
    if retries < 1:
        raise ValueError(f"read_image: retries must be >= 1, got {retries}")
    last_err: Exception | None = None
    for attempt in range(1, retries + 1):
        if not osp.exists(img_path):
            raise FileNotFoundError(f"Image file does not exist: '{img_path}'")
        try:
            return open_image(img_path)
        except OSError as err:  # PIL.UnidentifiedImageError is an OSError too
            last_err = err
            logger.warning("IOError reading '%s' (attempt %d/%d): %s", img_path, attempt, retries, err)
            if attempt < retries:
                time.sleep(retry_delay)
    raise OSError(f"Could not read image '{img_path}' after {retries} attempts: {last_err}") from last_err


def mkdir_if_missing(directory: str) -> None:
    """Create ``directory`` (and parents) unless it exists."""
    if not osp.exists(directory):
        try:
            os.makedirs(directory)
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise


def check_output_dir(path: str, option: str) -> None:
    """Raise an error naming ``option`` when ``path`` cannot be (created as) a writable folder: a file sits at
    ``path`` or at one of its parents (NotADirectoryError), or the deepest existing folder is read-only
    (PermissionError). Checked before any work, so nothing is computed for an output that cannot be written."""
    probe = osp.abspath(path)
    while not osp.exists(probe) and osp.dirname(probe) != probe:
        probe = osp.dirname(probe)
    if not osp.isdir(probe):
        raise NotADirectoryError(f"{option} {path}: '{probe}' is a file, not a folder; pass another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: the folder '{probe}' is read-only; pass another {option}")


def make_output_dir(path: str, option: str, exist_ok: bool = True) -> None:
    """``os.makedirs(path)`` after :func:`check_output_dir`; an OSError it still raises (a read-only file system,
    a race) names ``option``. ``FileExistsError`` with ``exist_ok=False`` passes through unchanged."""
    check_output_dir(path, option)
    try:
        os.makedirs(path, exist_ok=exist_ok)
    except FileExistsError:
        if not exist_ok or not osp.isdir(path):
            raise
    except OSError as err:
        raise type(err)(err.errno, f"{option} {path}: cannot create the folder: {err.strerror}") from None


def check_isfile(path: str) -> bool:
    """True if ``path`` is an existing file; logs a warning otherwise."""
    isfile = osp.isfile(path)
    if not isfile:
        logger.warning("No file found at '%s'", path)
    return isfile


def read_json(fpath: str) -> Any:
    """Load a json file (UTF-8, with or without a byte order mark, as some Windows editors write it); a missing,
    malformed, too deeply nested or non-UTF-8 file raises an error naming it (``utils.run_dir.read_json``)."""
    return _read_json(fpath)


def write_json(obj: Any, fpath: str) -> None:
    """Write ``obj`` as indented json (atomically), creating the parent directory."""
    mkdir_if_missing(osp.dirname(fpath) or ".")
    atomic_write(fpath, json.dumps(obj, indent=4, separators=(",", ": ")))


def _to_yaml_safe(value: Any) -> Any:
    """Turn tuples into lists (recursively) and unknown objects (torch.device...) into strings."""
    if isinstance(value, (list, tuple)):
        return [_to_yaml_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_yaml_safe(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_train_configs(path: str, args: argparse.Namespace | dict) -> str:
    """Write ``vars(args)`` to ``<path>/configs.yaml`` with ``yaml.safe_dump``; returns the file path."""
    mkdir_if_missing(path)
    cfg = dict(args) if isinstance(args, dict) else dict(vars(args))
    fpath = osp.join(path, CONFIG_FILE)
    atomic_write(fpath, yaml.safe_dump(_to_yaml_safe(cfg), default_flow_style=False, sort_keys=True))
    return fpath


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that also understands the original IRRA configs.yaml (``!!python/tuple``)."""


def _construct_tuple(loader: ConfigLoader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node, deep=True))


def _reject_python_tag(loader: ConfigLoader, tag_suffix: str, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None,
        f"unsupported YAML tag '!!python/{tag_suffix}' (only !!python/tuple is accepted in configs.yaml)",
        node.start_mark)


ConfigLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)
ConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/", _reject_python_tag)


def read_yaml(fpath: str, what: str = "YAML file") -> Any:
    """A YAML file read with :class:`ConfigLoader` through the careful reader: errors (not UTF-8, malformed, nested
    too deeply, a python tag) are ``FileReadError`` naming the file."""
    text = read_text(fpath, what)
    try:
        return yaml.load(io.StringIO(text), Loader=ConfigLoader)
    except yaml.YAMLError as e:
        raise FileReadError(fpath, f"Cannot read config file '{fpath}' ({what}): {e}") from None
    except RecursionError:
        raise FileReadError(fpath, f"the {what} is nested too deeply to be read") from None


def load_train_configs(path: str) -> argparse.Namespace:
    """Read a configs.yaml (``path`` is the file or its run directory) into an ``argparse.Namespace``.

    ``img_size`` and ``milestones`` come back as tuples whether they were written as lists or python tuples.
    """
    fpath = osp.join(path, CONFIG_FILE) if osp.isdir(path) else path
    if not osp.isfile(fpath):
        raise FileNotFoundError(f"Config file not found: '{fpath}'")
    cfg = read_yaml(fpath, "config file")
    if not isinstance(cfg, dict):
        raise ValueError(f"Config file '{fpath}' must hold a mapping of option names to values, "
                         f"got {type(cfg).__name__}")
    for key in TUPLE_OPTIONS:
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    return argparse.Namespace(**cfg)
