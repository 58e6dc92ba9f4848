"""Train-loader throughput (samples/s, median of repeats) on SynthPEDES at 384x128.

By default the demo images (128x64 PNGs) are upscaled to 384x128 by the train transform (Resize, flip, ToTensor,
Normalize; --img_aug adds Pad/RandomCrop/RandomErasing); ``--native`` generates the images at 384x128 instead so only
decoding changes. MLM masking and tokenization caching are included (``--MLM``, on by default).

    python -m benchmarks.bench_dataloader [--root_dir DIR] [--workers 0 2] [--batch_size 64] [--batches 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from datasets.build import build_dataloader, set_train_epoch
from utils.options import default_args
from datasets.synthpedes import SynthPEDES


def measure(args: argparse.Namespace, dataset, workers: int) -> list:
    """Samples/s of ``args.batches`` batches (after one warm-up batch) for each repeat."""
    run_args = argparse.Namespace(**{**vars(args), "num_workers": workers})
    train_loader, _, _, _ = build_dataloader(run_args, dataset=dataset)
    rates = []
    for rep in range(args.repeats):
        set_train_epoch(train_loader, rep)
        it = iter(train_loader)
        next(it)  # warm-up: worker start-up and the first batch are not counted
        n, t0 = 0, time.perf_counter()
        for _ in range(args.batches or len(train_loader) - 1):  # 0: the rest of the epoch
            batch = next(it)
            n += batch["images"].shape[0]
        rates.append(n / (time.perf_counter() - t0))
        del it
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root_dir", default=None, help="where SynthPEDES is (generated if missing); default: temp dir")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20,
                   help="timed batches per repeat (0: a whole epoch but its first, warm-up, batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--img_size", type=int, nargs=2, default=(384, 128))
    p.add_argument("--native", action="store_true", help="generate SynthPEDES at --img_size instead of 128x64")
    p.add_argument("--img_aug", action="store_true")
    p.add_argument("--no_mlm", dest="MLM", action="store_false")
    p.add_argument("--sampler", default="random", choices=("random", "identity"))
    opts = p.parse_args()
    torch.set_num_threads(1)

    tmp = None
    root = opts.root_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_dataloader_")
        root = tmp.name
    gen = dict(img_height=opts.img_size[0], img_width=opts.img_size[1]) if opts.native else {}
    t0 = time.perf_counter()
    dataset = SynthPEDES(root, verbose=False, **gen)
    t_gen = time.perf_counter() - t0
    src = f"{opts.img_size[0]}x{opts.img_size[1]} native" if opts.native else "128x64 upscaled by the transform"

    args = default_args(
        dataset_name="SynthPEDES", root_dir=root, MLM=opts.MLM, sampler=opts.sampler, num_instance=4,
        batch_size=opts.batch_size, test_batch_size=512, num_workers=0, img_size=tuple(opts.img_size),
        img_aug=opts.img_aug, val_dataset="test", skip_image_check=True)
    args = args.replace(batches=opts.batches, repeats=opts.repeats)  # this script's own settings, read by measure()
    print(f"SynthPEDES ready in {t_gen:.1f}s ({len(dataset.train)} train captions); images: {src}; "
          f"img_size {opts.img_size[0]}x{opts.img_size[1]}, batch {opts.batch_size}, MLM {opts.MLM}, "
          f"aug {opts.img_aug}, sampler {opts.sampler}, torch threads 1, CPUs {os.cpu_count()}")
    print(f"{'workers':>8} {'median samples/s':>17} {'runs':>30}")
    for w in opts.workers:
        rates = measure(args, dataset, w)
        print(f"{w:>8} {statistics.median(rates):>17.1f} {', '.join(f'{r:.1f}' for r in rates):>30}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
