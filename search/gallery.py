"""A gallery of arbitrary image files for search: listing a folder's images, reading them one try each, and batching
the readable ones (unreadable files are skipped and reported, never fatal)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.iotools import open_image

logger = logging.getLogger("IRRA.retrieval")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_images(folder: str | os.PathLike) -> list[str]:
    """All .jpg/.jpeg/.png files under ``folder`` (recursively, case-insensitive), sorted.

    Symlinks rule (the same for visualize.py --gallery and the search page): a gallery is what lies inside its
    folder. Symbolic links are followed, to files and to folders, while they lead to a place inside the folder
    (another name of a gallery file is listed once, a link loop ends); a link that leads outside the folder is
    skipped, and so is a broken one; how many were skipped, with the first few names, is logged as a warning. To
    search photos kept elsewhere, point ``folder`` at them (or at a common parent), not a link at them.

    Raises FileNotFoundError when the folder does not exist and ValueError when it holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"gallery folder {str(root)!r} does not exist or is not a directory")
    real_root = os.path.realpath(root)

    def inside(p: str) -> bool:
        return os.path.commonpath([real_root, os.path.realpath(p)]) == real_root

    seen_dirs: set[str] = set()
    found, outside = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen_dirs:  # reached again through a link: a loop, or a second way in
            dirnames[:] = []
            continue
        seen_dirs.add(real_dir)
        dirnames.sort()
        for d in list(dirnames):
            if not inside(os.path.join(dirpath, d)):  # a folder link out of the gallery: not walked
                outside.append(os.path.join(dirpath, d))
                dirnames.remove(d)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(p):  # broken links: skipped
                if inside(p):
                    found.append(p)
                else:
                    outside.append(p)
    seen_files: set[str] = set()
    paths = []
    for p in sorted(found):
        real = os.path.realpath(p)
        if real in seen_files:
            continue
        seen_files.add(real)
        paths.append(p)
    if outside:
        outside.sort()
        logger.warning("gallery %s: %d symbolic link(s) lead outside the folder and are skipped (%s%s)", root,
                       len(outside), ", ".join(outside[:3]), ", ..." if len(outside) > 3 else "")
    if not paths:
        raise ValueError(f"gallery folder {str(root)!r} contains no images (expected files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
    return paths


# What opening an arbitrary image file can raise (PIL.UnidentifiedImageError is an OSError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


class ImageFileDataset(Dataset):
    """Image files by path -> ``(index, img)``; a file that cannot be read gives ``(index, None)`` instead of raising.

    For galleries of arbitrary photos (visualize.py --gallery): the caller skips and reports the unreadable ones
    (batch with :func:`collate_skip_unreadable`). One read attempt per file, through ``utils.iotools.open_image``.
    """

    def __init__(self, img_paths: Sequence[str], transform: Optional[Callable] = None) -> None:
        self.img_paths = list(img_paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.img_paths)

    def __getitem__(self, index: int) -> Tuple[int, Any]:
        try:
            img = open_image(self.img_paths[index])
        except UNREADABLE_IMAGE_ERRORS:
            return index, None
        return index, self.transform(img) if self.transform is not None else img


def collate_skip_unreadable(batch: List[Tuple[int, Optional[torch.Tensor]]]
                            ) -> Tuple[List[int], Optional[torch.Tensor], List[int]]:
    """Collate :class:`ImageFileDataset` items: (read indices, their images stacked [B, 3, H, W] or None, failed)."""
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


def warn_skipped(skipped: Sequence[str]) -> None:
    """One warning listing the gallery files that could not be opened."""
    if skipped:
        logger.warning("skipped %d image(s) that could not be opened: %s", len(skipped), ", ".join(skipped))
