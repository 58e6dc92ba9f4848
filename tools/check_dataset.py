"""Dataset report:  python -m tools.check_dataset --dataset_name CUHK-PEDES --root_dir data [--text_length 77]

Parses the annotation, fully decodes every image, names missing / zero-byte / unreadable images (exit code 1) and
warns about tiny and huge (over ``datasets.check.HUGE_IMAGE_PIXELS``) images, duplicate image paths, identities in two splits; prints per-split counts, the caption
length distribution in BPE tokens and how many captions ``--text_length`` cuts. Exit code 2: the dataset cannot be
parsed. The image check itself is the library ``datasets/check.py``.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from datasets.build import DATASET_REGISTRY, build_dataset
from datasets import check as image_check
from datasets.check import LOAD, MAX_BAD_SHOWN, SPLITS, scan_images
from utils.simple_tokenizer import get_tokenizer

# Images smaller than this on a side are reported as tiny (a warning).
TINY_IMAGE_SIDE = 16
# Caption-length histogram: number of bins and the width of the longest bar in characters.
HIST_BINS = 10
HIST_BAR_WIDTH = 40
EXIT_OK, EXIT_BAD_IMAGES, EXIT_BAD_DATASET = 0, 1, 2


def caption_token_lengths(captions: Sequence[str], show_progress: bool = True) -> List[int]:
    """Length in BPE tokens of each caption, SOT and EOT included (what ``tokenize`` fills before cutting)."""
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
        by_image = {image_id: (dataset.raw_train_id(pid), path) for pid, image_id, path, _ in dataset.train}
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
    huge_pixels = image_check.HUGE_IMAGE_PIXELS  # read at call time (one home, datasets/check.py)
    huge = [f"{p}: {w}x{h} ({w * h / 1e6:.1f} Mpx)" for p, (w, h) in scan.sizes.items() if w * h > huge_pixels]
    if huge:
        print(f"  WARNING: {len(huge)} images are huge (over {huge_pixels / 1e6:.1f} Mpx; every read decodes "
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
    """``python -m tools.check_dataset``: parse a dataset and print the report; returns the exit code
    (0 fine or warnings only, 1 missing / empty / unreadable images, 2 the dataset cannot be parsed)."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.check_dataset",
        description="Check a text-to-person dataset: annotation, every image file, duplicates, caption lengths.")
    parser.add_argument("--dataset_name", default="CUHK-PEDES",
                        help=f"one of {', '.join(DATASET_REGISTRY)} (datasets/build.py DATASET_REGISTRY)")
    parser.add_argument("--root_dir", default="./data", help="folder that holds the dataset folder")
    parser.add_argument("--anno_file", default="", help="annotation file instead of the dataset's own (as in training)")
    parser.add_argument("--text_length", type=int, default=77, help="report how many captions this length cuts")
    parser.add_argument("--max_shown", type=int, default=MAX_BAD_SHOWN, help="files listed per finding (0: all)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    try:
        dataset = build_dataset(args.dataset_name, root=args.root_dir, verbose=False, anno_file=args.anno_file)
    except (OSError, ValueError) as err:  # FileNotFoundError, DatasetFormatError, malformed json, unknown name
        print(f"error: cannot parse {args.dataset_name} under '{args.root_dir}':\n{err}", file=sys.stderr)
        return EXIT_BAD_DATASET
    files = list(dict.fromkeys(dataset.anno_paths.values()))  # one file, or one per split (the per-split layout)
    print(f"{args.dataset_name}: {', '.join(files)}")
    return report(dataset, text_length=args.text_length, max_shown=args.max_shown,
                  show_progress=not args.no_progress)


if __name__ == "__main__":
    from utils.cli import run_main

    run_main(main, prog="python -m tools.check_dataset")
