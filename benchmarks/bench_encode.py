"""Evaluation encoding throughput: images/s and texts/s of ``encode_image`` / ``encode_text`` (what the Evaluator runs
over a test split), the original computation vs ours, on random weights and random inputs of the test split's shapes.

  original  ``model.fast = False`` (captions at full --text_length) and nn.MultiheadAttention's forward
  ours      the defaults: captions cut to the batch's longest (``model.fast``), fused attention

Captions are random token ids of random lengths (``--min_tokens``..``--max_tokens`` including SOT/EOT; CUHK-PEDES
captions are ~25 tokens long), padded to --text_length. Inputs are made on the device first, so the loader is not
measured (see bench_dataloader.py). Median of ``--runs`` passes over ``--images`` images and ``--texts`` captions.

    python -m benchmarks.bench_encode                                   # ViT-B/16 shapes, 384x128, fp32, CPU-sized
    python -m benchmarks.bench_encode --device auto --precision fp16 --images 6144 --texts 6144 --batch_size 512
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import torch

from benchmarks.bench_train_variants import scratch_name, synchronize
from model.build import build_model
from utils.choices import PRECISIONS
from model.clip_model import SCRATCH_ARCHS, SCRATCH_PREFIX
from utils.comm import resolve_device
from utils.options import get_args
from datasets.cuhkpedes import TRAIN_IDS  # CUHK-PEDES's identities: the full-size id head

VARIANTS = ("original", "ours")


def random_captions(n: int, length: int, min_tokens: int, max_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """[n, length] ids: SOT, random words, EOT (the largest id, so argmax finds it), zero padding."""
    caps = torch.zeros(n, length, dtype=torch.long)
    sizes = torch.randint(min_tokens, max_tokens + 1, (n,), generator=generator).clamp(max=length)
    for i, size in enumerate(sizes.tolist()):
        caps[i, 0] = 49406
        caps[i, 1:size - 1] = torch.randint(1, 49000, (size - 2,), generator=generator)
        caps[i, size - 1] = 49407
    return caps


def time_passes(fn, batches: List[torch.Tensor], device: torch.device, runs: int) -> List[float]:
    """Seconds of each of ``runs`` passes of ``fn`` over ``batches`` (after one untimed pass)."""
    times = []
    for r in range(runs + 1):
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                fn(b)
        synchronize(device)
        if r:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B/16",
                   help=f"one of {', '.join(SCRATCH_ARCHS)}, with or without {SCRATCH_PREFIX!r} (random weights)")
    p.add_argument("--img_size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    p.add_argument("--text_length", type=int, default=77)
    p.add_argument("--precision", default="fp32", choices=[c for c in PRECISIONS if c != "auto"],
                   help="fp16: the original's fp16 weights; the AMP precisions evaluate in fp32 weights, as the "
                        "Evaluator (no autocast)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int, default=64, help="the test loader's batch size (--test_batch_size)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--min_tokens", type=int, default=12)
    p.add_argument("--max_tokens", type=int, default=40)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    opt = p.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    device = resolve_device(opt.device)
    args = get_args(["--pretrain_choice", scratch_name(opt.arch), "--img_size", *map(str, opt.img_size),
                     "--text_length", str(opt.text_length), "--precision", opt.precision, "--device", str(device),
                     "--loss_names", "sdm+id"])
    torch.manual_seed(0)
    model = build_model(args, TRAIN_IDS, device=device).to(device).eval()
    g = torch.Generator().manual_seed(0)
    dtype = model.base_model.dtype
    images = [torch.randn(min(opt.batch_size, opt.images - i), 3, *opt.img_size, generator=g).to(device, dtype)
              for i in range(0, opt.images, opt.batch_size)]
    caps = random_captions(opt.texts, opt.text_length, opt.min_tokens, opt.max_tokens, g)
    texts = [c.to(device) for c in caps.split(opt.batch_size)]

    def use(variant: str) -> None:
        model.fast = variant == "ours"
        model.set_fused_attention(variant == "ours")

    for variant in VARIANTS:  # warm up both first (kernel selection, allocator), so that the order does not count
        use(variant)
        time_passes(model.encode_image, images[:1], device, 1)
        time_passes(model.encode_text, texts[:1], device, 1)
    results: Dict[str, Dict[str, float]] = {}
    features = {}
    for variant in VARIANTS:
        use(variant)
        t_img = time_passes(model.encode_image, images, device, opt.runs)
        t_txt = time_passes(model.encode_text, texts, device, opt.runs)
        with torch.no_grad():
            features[variant] = (model.encode_image(images[0]), model.encode_text(texts[0]))
        results[variant] = dict(images_s=opt.images / statistics.median(t_img),
                                texts_s=opt.texts / statistics.median(t_txt))
    diff = max(float((a - b).abs().max()) for a, b in zip(features["ours"], features["original"]))
    print(f"arch {scratch_name(opt.arch)}, img {tuple(opt.img_size)}, precision {opt.precision} (weights {dtype}), "
          f"device {device}, threads {torch.get_num_threads()}, batch {opt.batch_size}, {opt.images} images, "
          f"{opt.texts} captions of {opt.min_tokens}-{opt.max_tokens} tokens, median of {opt.runs} passes")
    print(f"{'variant':10} {'images/s':>10} {'texts/s':>10}")
    for v, r in results.items():
        print(f"{v:10} {r['images_s']:10.1f} {r['texts_s']:10.1f}")
    o, b = results["ours"], results["original"]
    print(f"ours vs original: images {o['images_s'] / b['images_s']:.2f}x, texts {o['texts_s'] / b['texts_s']:.2f}x; "
          f"max |ours - original| over the first batch's features: {diff:.2e}")


if __name__ == "__main__":
    main()
