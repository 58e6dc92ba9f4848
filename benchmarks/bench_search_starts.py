"""The search page's starts and a growing gallery (``python -m benchmarks.bench_search_page --mode starts|grow``).

--mode starts: ``SearchPage.for_test_split`` (what ``visualize.py --serve`` does once the model is loaded) on a
    generated test split of CUHK-PEDES's size (``--images`` 3,074 images of 1,000 identities, ``--captions`` 6,156
    captions), twice, each time with a new Retriever on the same run folder: the first start encodes the images and
    the captions and ranks every caption (R1/mAP, failures); the second reads both caches and ranks. With
    ``--sample N`` (default 0: off) the first start is not run in full (about 45 CPU-minutes at full size): the
    encoding rates are measured on N images and 2N captions, the first start runs with synthesized embeddings (cache
    writes and ranking measured) and its encoding time is the measured rates times the split's size; the second start
    is always measured in full, with the real model.
--mode grow: a folder of ``--gallery_size`` photos (default 10,000) whose cache exists, searched again (a start with
    nothing new), then with ``--added`` photos (default 10) added: only those are encoded. The first cache is written
    through the real cache code with synthesized embeddings (encoding 10,000 photos is the one-time cost the cache
    removes, and would take most of an hour here); the timed starts use the real model.

The model is the real architecture at full size with random weights (``--arch``, default ``scratch:ViT-B/16``: no
CLIP file here; times do not depend on the values). The run's "checkpoint" is a small file: the caches are keyed by
its path, mtime and size, not its contents. Images are small generated JPEGs (the test transform resizes them to
the run's 384x128 as it would real photos).
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from datasets.build import build_transforms
from datasets.cuhkpedes import TRAIN_IDS  # CUHK-PEDES's identities: the full-size id head
from model.build import build_model
from search.gallery import Gallery
from search.retrieval import QueryTokenizer, Retriever
from search.server import SearchPage
from utils.options import get_args
from utils.run_dir import BEST_CHECKPOINT
from utils.simple_tokenizer import get_tokenizer

COLOURS = ["red", "blue", "black", "white", "grey", "green", "yellow", "pink", "brown", "purple"]
CLOTHES = ["jacket", "shirt", "coat", "skirt", "trousers", "jeans", "dress", "hoodie", "shorts", "sweater"]


def write_photos(folder: Path, n: int, start: int = 0) -> list[str]:
    """``n`` small JPEGs of people-like proportions (128 x 48), each a different colour pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        img = Image.new("RGB", (48, 128), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
        img.paste(((11 * i) % 256, (67 * i) % 256, (29 * i) % 256), (8, 40, 40, 100))
        p = folder / f"{i:06d}.jpg"
        img.save(p, quality=85)
        paths.append(str(p))
    return paths


def caption(i: int) -> str:
    """A CUHK-PEDES-like caption (20-30 words), different for each i."""
    c = lambda k: COLOURS[(i // 10 ** k) % 10]  # noqa: E731
    w = lambda k: CLOTHES[(i * 7 + k) % 10]  # noqa: E731
    return (f"The person is wearing a {c(0)} {w(0)} over a {c(1)} {w(1)} with {c(2)} {w(2)}. "
            f"The person carries a {c(3)} bag and wears {c(0)} shoes while walking down the street.")


def _setup(opt, root: Path):
    """(model args, model, a Retriever factory on run folder root/run)."""
    if opt.threads:
        torch.set_num_threads(opt.threads)
    args = get_args(["--pretrain_choice", opt.arch, "--device", "cpu"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(args, num_classes=TRAIN_IDS, device=torch.device("cpu")).eval()
    build_s = time.perf_counter() - t0
    run = root / "run"
    run.mkdir()
    ckpt = run / BEST_CHECKPOINT
    ckpt.write_bytes(b"stands for the weights: the caches key its path, mtime and size")
    transform = build_transforms(img_size=tuple(args.img_size), is_train=False)
    tokenizer = QueryTokenizer(get_tokenizer(), int(args.text_length))

    def make() -> Retriever:
        return Retriever(model, transform, tokenizer, torch.device("cpu"), run_dir=run, checkpoint=ckpt, args=args,
                         batch_size=64, num_workers=0)

    return args, build_s, make


def _counting(r: Retriever) -> dict:
    """Count and time what ``r`` encodes (images, sentences)."""
    stats = {"images": 0, "texts": 0, "image_s": 0.0, "text_s": 0.0}
    enc_i, enc_t = r.encode_images, r.encode_texts

    def images(paths, progress=True):
        t = time.perf_counter()
        g = enc_i(paths, progress=False)
        stats["images"] += len(paths)
        stats["image_s"] += time.perf_counter() - t
        return g

    def texts(t_):
        t = time.perf_counter()
        e = enc_t(t_)
        stats["texts"] += len(t_)
        stats["text_s"] += time.perf_counter() - t
        return e

    r.encode_images, r.encode_texts = images, texts
    return stats


def _machine(opt, args, build_s) -> str:
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average "
            f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}, {torch.get_num_threads()} threads; model "
            f"{opt.arch} (random weights, built in {build_s:.1f} s), image {tuple(args.img_size)}, text_length "
            f"{args.text_length}")


def _synthesized(r: Retriever, dim: int, gen: torch.Generator) -> None:
    """Make ``r`` encode random unit vectors instead of running the model (seeding caches quickly)."""
    r.encode_images = lambda p, progress=True: Gallery(
        list(p), F.normalize(torch.randn(len(p), dim, generator=gen), dim=-1), list(range(len(p))))
    r.encode_texts = lambda t: F.normalize(torch.randn(len(t), dim, generator=gen), dim=-1)


def starts(opt) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args, build_s, make = _setup(opt, root)
        paths = write_photos(root / "test_imgs", opt.images)
        ids = min(1000, opt.images)  # CUHK-PEDES's test split: 1,000 identities
        image_pids = [i * ids // opt.images for i in range(opt.images)]
        caption_img = [i * opt.images // opt.captions for i in range(opt.captions)]  # ~2 captions per image
        split = {"img_paths": paths, "image_pids": image_pids, "captions": [caption(i) for i in range(opt.captions)],
                 "caption_pids": [image_pids[j] for j in caption_img]}
        print(_machine(opt, args, build_s))
        print(f"test split: {opt.images} images of {ids} identities, {opt.captions} captions")
        first = None
        if opt.sample:  # encoding rates on a sample; the first start's caches are written from synthesized embeddings
            r = make()
            n_img, n_txt = min(opt.sample, opt.images), min(2 * opt.sample, opt.captions)
            t = time.perf_counter()
            dim = r.encode_images(paths[:n_img], progress=False).embeddings.shape[1]
            img_rate = (time.perf_counter() - t) / n_img
            t = time.perf_counter()
            r.encode_texts(split["captions"][:n_txt])
            txt_rate = (time.perf_counter() - t) / n_txt
            print(f"encoding rate measured on {n_img} images and {n_txt} captions: {img_rate * 1000:.0f} ms an image, "
                  f"{txt_rate * 1000:.0f} ms a caption")
            _synthesized(r, dim, torch.Generator().manual_seed(0))
            t = time.perf_counter()
            SearchPage.for_test_split(r, split, progress=False)
            rest = time.perf_counter() - t
            first = img_rate * opt.images + txt_rate * opt.captions
            print(f"first start (no cache), estimated: {first + rest:.0f} s = encoding {opt.images} images "
                  f"{img_rate * opt.images:.0f} s + {opt.captions} captions {txt_rate * opt.captions:.0f} s (at the "
                  f"measured rates) + cache writes and ranking {rest:.1f} s (measured)")
        for name in (("second start (cached)",) if first is not None else
                     ("first start (no cache)", "second start (cached)")):
            r = make()
            stats = _counting(r)
            t = time.perf_counter()
            page = SearchPage.for_test_split(r, split, progress=False)
            total = time.perf_counter() - t
            rest = total - stats["image_s"] - stats["text_s"]
            print(f"{name}: {total:.1f} s = encoding {stats['images']} images {stats['image_s']:.1f} s + "
                  f"{stats['texts']} captions {stats['text_s']:.1f} s + cache reads and ranking {rest:.1f} s "
                  f"(R1 {page.test.metrics['R1']:.2f})")


def grow(opt) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args, build_s, make = _setup(opt, root)
        folder = root / "photos"
        t = time.perf_counter()
        write_photos(folder, opt.gallery_size)
        write_s = time.perf_counter() - t
        seed = make()
        _synthesized(seed, seed.encode_texts(["a person"]).shape[1], torch.Generator().manual_seed(0))
        seed.encode_folder(folder, progress=False)  # synthesized embeddings: see the docstring
        print(_machine(opt, args, build_s))
        print(f"gallery: {opt.gallery_size} photos written in {write_s:.1f} s, cache seeded")
        r = make()
        stats = _counting(r)
        t = time.perf_counter()
        g = r.encode_folder(folder, progress=False)
        print(f"start with nothing new: {time.perf_counter() - t:.2f} s ({stats['images']} images encoded, "
              f"{len(g)} in the gallery)")
        new = write_photos(folder, opt.added, start=opt.gallery_size)
        r = make()
        stats = _counting(r)
        t = time.perf_counter()
        g = r.encode_folder(folder, progress=False)
        total = time.perf_counter() - t
        print(f"start with {opt.added} photos added: {total:.2f} s = encoding {stats['images']} images "
              f"{stats['image_s']:.2f} s + listing, stat, cache read and write {total - stats['image_s']:.2f} s "
              f"({len(g)} in the gallery)")
        per_image = stats["image_s"] / max(stats["images"], 1)
        print(f"(encoding all {len(g)} again, as the per-list cache did, would take about "
              f"{per_image * len(g):.0f} s at {per_image * 1000:.0f} ms an image)")
        assert stats["images"] == len(new), "only the added photos must be encoded"


def run_mode(opt) -> None:
    """Entry of ``bench_search_page --mode starts|grow``."""
    if opt.mode == "starts":
        starts(opt)
    else:
        grow(opt)
