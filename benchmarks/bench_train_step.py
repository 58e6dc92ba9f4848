"""Time one IRRA training step (forward + backward + Adam) with and without the model's fast path.

The fast path (``model.fast = True``, the default) (a) runs the MLM head only at masked positions and (b) cuts
the caption ids to the longest caption of the batch before the text transformer; both give the same numbers.
This script builds a tiny IRRA (scratch CLIP, width 128), a batch of realistic template captions, checks that the
two paths give the same losses, then times both and prints samples/s (median of --runs) and the speed-up.

    python -m benchmarks.bench_train_step                       # defaults: bs 32, 192x64, sdm+mlm+id
    python -m benchmarks.bench_train_step --profile             # + a torch.profiler table for each path
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Dict, List

import torch


from model.build import build_model
from solver import build_optimizer
from utils.options import get_args
from utils.simple_tokenizer import get_tokenizer, tokenize
from datasets.cuhkpedes import TRAIN_IDS  # CUHK-PEDES's identities: the full-size id head

COLORS = ["black", "white", "red", "blue", "green", "grey", "yellow", "brown", "pink", "navy"]
TOPS = ["t-shirt", "jacket", "coat", "hoodie", "sweater", "shirt", "dress", "blouse"]
BOTTOMS = ["jeans", "shorts", "trousers", "skirt", "pants", "leggings"]
EXTRAS = ["a backpack", "a handbag", "sneakers", "boots", "a cap", "glasses", "an umbrella", "a phone"]
SUBJECTS = ["The man", "A woman", "The young lady", "An old man", "A boy", "The girl", "A tall person"]


def make_caption(rng: random.Random) -> str:
    """A template person description of roughly 15-30 BPE tokens."""
    c = rng.sample(COLORS, 4)
    s = (f"{rng.choice(SUBJECTS)} is wearing a {c[0]} {rng.choice(TOPS)} and {c[1]} {rng.choice(BOTTOMS)}. "
         f"{rng.choice(['He', 'She', 'The person'])} carries {rng.choice(EXTRAS)}")
    if rng.random() < 0.6:
        s += f" and wears {c[2]} {rng.choice(['shoes', 'boots', 'sandals'])}"
    if rng.random() < 0.4:
        s += f", walking next to a {c[3]} car"
    return s + "."


def make_batch(bs: int, img_size: tuple, text_length: int, num_classes: int, seed: int = 0,
               mlm_probability: float = 0.15) -> Dict[str, torch.Tensor]:
    """images, caption_ids, pids (bs//4 ids x 4), image_ids, mlm_ids / mlm_labels (15% of words masked)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tok = get_tokenizer()
    mask_id = tok.encoder["<|mask|>"]
    caps = torch.stack([tokenize(make_caption(rng), tok, text_length) for _ in range(bs)])  # [B, L]
    mlm_ids, mlm_labels = caps.clone(), torch.zeros_like(caps)
    for i in range(bs):
        eot = int(caps[i].argmax())
        pos = list(range(1, eot))
        chosen = [p for p in pos if rng.random() < mlm_probability] or [rng.choice(pos)]
        for p in chosen:
            mlm_labels[i, p] = caps[i, p]
            mlm_ids[i, p] = mask_id
    pids = torch.arange(bs) // 4 % num_classes
    return dict(images=torch.randn(bs, 3, *img_size, generator=g), caption_ids=caps, pids=pids,
                image_ids=torch.arange(bs), mlm_ids=mlm_ids, mlm_labels=mlm_labels)


def make_args(opt: argparse.Namespace) -> argparse.Namespace:
    """The IRRA options (the original's defaults: Adam, lr 1e-5, per-parameter groups) except the tiny backbone."""
    args = get_args(["--pretrain_choice", opt.arch, "--img_size", *map(str, opt.img_size), "--loss_names",
                     opt.loss_names, "--cmt_depth", str(opt.cmt_depth), "--text_length", str(opt.text_length),
                     "--precision", "fp32", "--device", "cpu"])
    return args


def time_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Dict[str, torch.Tensor],
               warmup: int, runs: int, clock=time.perf_counter) -> List[Dict[str, float]]:
    """Per measured step: seconds of forward / backward / optimizer and their total."""
    out = []
    for i in range(warmup + runs):
        t0 = clock()
        ret = model(batch)
        loss = sum(v for k, v in ret.items() if "loss" in k)
        t1 = clock()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = clock()
        optimizer.step()
        t3 = clock()
        if i >= warmup:
            out.append(dict(forward=t1 - t0, backward=t2 - t1, optimizer=t3 - t2, total=t3 - t0))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="scratch:ViT-Tiny")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--img_size", type=int, nargs=2, default=(192, 64))
    p.add_argument("--text_length", type=int, default=77)
    p.add_argument("--loss_names", default="sdm+mlm+id")
    p.add_argument("--cmt_depth", type=int, default=4)
    p.add_argument("--num_classes", type=int, default=TRAIN_IDS)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--adam", choices=("plain", "fused", "both"), default="both",
                   help="the optimizer of solver/build.py: plain Adam (default of train.py), fused "
                        "(--fused_optimizer), or both, one after the other")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: time.perf_counter; cpu: time.process_time (CPU seconds of this process, less sensitive "
                        "to other processes on a shared machine; use with --threads 1)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table for one step of each path")
    opt = p.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    torch.manual_seed(0)

    args = make_args(opt)
    model = build_model(args, opt.num_classes)
    model.train()
    batch = make_batch(opt.batch_size, tuple(opt.img_size), opt.text_length, opt.num_classes)
    lens = (batch["caption_ids"].argmax(-1) + 1).float()
    n_masked = int((batch["mlm_labels"] != 0).sum())
    print(f"arch {opt.arch}, bs {opt.batch_size}, img {tuple(opt.img_size)}, losses {opt.loss_names}, "
          f"cmt_depth {opt.cmt_depth}, threads {torch.get_num_threads()}, clock {opt.clock}, adam {opt.adam}")
    print(f"caption tokens (with SOT/EOT): mean {lens.mean():.1f}, max {int(lens.max())} of {opt.text_length}; "
          f"masked tokens {n_masked} of {opt.batch_size * opt.text_length} positions")

    # same numbers on both paths, in train mode as the timed steps (the model has no dropout: train mode is
    # deterministic)
    with torch.no_grad():
        model.fast = False
        ref = model(batch)
        model.fast = True
        fast = model(batch)
    diffs = {k: abs(float(ref[k]) - float(fast[k])) for k in ref}
    print("max |fast - full| over the forward dict:", f"{max(diffs.values()):.2e}",
          {k: f"{float(fast[k]):.5f}" for k in fast})

    clock = time.perf_counter if opt.clock == "wall" else time.process_time
    for impl in (("plain", "fused") if opt.adam == "both" else (opt.adam,)):
        args = args.replace(fused_optimizer=impl == "fused")
        optimizer = build_optimizer(args, model)
        # interleave the two paths step by step so that background load hits both alike
        times: Dict[bool, List[Dict[str, float]]] = {False: [], True: []}
        for i in range(opt.warmup + opt.runs):
            for fast_path in (False, True):
                model.fast = fast_path
                step = time_steps(model, optimizer, batch, 0, 1, clock)[0]
                if i >= opt.warmup:
                    times[fast_path].append(step)
        results = {}
        print(f"--- optimizer: {args.optimizer} ({impl})")
        for fast_path in (False, True):
            med = {k: statistics.median(t[k] for t in times[fast_path])
                   for k in ("forward", "backward", "optimizer", "total")}
            results[fast_path] = med["total"]
            print(f"fast={fast_path!s:5}: median {med['total'] * 1e3:8.1f} ms/step  "
                  f"{opt.batch_size / med['total']:8.1f} samples/s  [forward {med['forward'] * 1e3:.0f} / backward "
                  f"{med['backward'] * 1e3:.0f} / optimizer {med['optimizer'] * 1e3:.0f} ms]  (runs: "
                  + ", ".join(f"{t['total'] * 1e3:.0f}" for t in times[fast_path]) + " ms)")
        print(f"speed-up fast/full ({impl} {args.optimizer}): {results[False] / results[True]:.2f}x")

    if opt.profile:
        from torch.profiler import ProfilerActivity, profile
        for fast_path in (False, True):
            model.fast = fast_path
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                time_steps(model, optimizer, batch, 0, 1)
            print(f"--- profile fast={fast_path}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
