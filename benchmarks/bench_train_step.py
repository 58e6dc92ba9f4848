"""Time one IRRA training step (forward + backward + Adam) with and without the model's fast path; or, with
``--methods irra tbps``, the training steps of several methods at the same backbone, batch and image size.

The fast path (``model.fast = True``, the default) (a) runs the MLM head only at masked positions and (b) cuts
the caption ids to the longest caption of the batch before the text transformer; both give the same numbers.
This script builds a tiny IRRA (scratch CLIP, width 128), a batch of realistic template captions, checks that the
two paths give the same losses, then times both and prints samples/s (median of --runs) and the speed-up.

    python -m benchmarks.bench_train_step                       # defaults: bs 32, 192x64, sdm+mlm+id
    python -m benchmarks.bench_train_step --profile             # + a torch.profiler table for each path
    python -m benchmarks.bench_train_step --methods irra tbps    # IRRA's step against TBPS-CLIP's, same run

Methods mode: each method is built by the registry from its own defaults (its losses: IRRA sdm+mlm+id with
--cmt_depth, TBPS nitc+mvs+ss+citc+ritc with the --simclr_mlp head; its optimizer: IRRA Adam, TBPS AdamW) on the same
--arch, --batch_size, --img_size and captions; the step is the trainer's (processor.prepare_batch + train_step). A
TBPS batch also holds its three extra views (aug1, aug_ss_1, aug_ss_2: random images of the same size) and N-ITC's
alpha (--softlabel_ratio, as after the first epoch). The steps of the methods are interleaved so that background load
hits them alike; medians and the ratio to the first method are printed. The loaders' work (TBPS makes four views of
each image, IRRA one) is not in the step.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Dict, List

import torch


from model.build import build_model
from processor.processor import prepare_batch, train_step
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


def method_args(opt: argparse.Namespace, method: str) -> argparse.Namespace:
    """A method's own options (its defaults) at the benchmark's backbone, image size and caption length."""
    argv = ["--method", method, "--pretrain_choice", opt.arch, "--img_size", *map(str, opt.img_size),
            "--text_length", str(opt.text_length), "--precision", "fp32", "--device", "cpu"]
    if method == "irra":
        argv += ["--loss_names", opt.loss_names, "--cmt_depth", str(opt.cmt_depth)]
    elif method == "tbps":
        argv += ["--simclr_mlp", *map(str, opt.simclr_mlp)]
    return get_args(argv)


def method_batch(method: str, args: argparse.Namespace, batch: Dict[str, torch.Tensor], seed: int = 1
                 ) -> Dict[str, torch.Tensor]:
    """The benchmark batch as the method's train loader gives it (TBPS: + its three extra views and alpha)."""
    if method != "tbps":
        return dict(batch)
    g = torch.Generator().manual_seed(seed)
    views = {k: torch.randn(batch["images"].shape, generator=g) for k in ("aug1", "aug_ss_1", "aug_ss_2")}
    return {"images": batch["images"], "caption_ids": batch["caption_ids"], "pids": batch["pids"], **views,
            "alpha": torch.tensor(args.softlabel_ratio)}


def compare_methods(opt: argparse.Namespace, clock) -> Dict[str, Dict[str, float]]:
    """Time the trainer's step of each method of ``opt.methods`` (interleaved); print medians and ratios."""
    base = make_batch(opt.batch_size, tuple(opt.img_size), opt.text_length, opt.num_classes)
    parts = {}
    for method in opt.methods:
        torch.manual_seed(0)
        args = method_args(opt, method)
        model = build_model(args, opt.num_classes)
        model.train()
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        parts[method] = [args, model, prepare_batch(model, method_batch(method, args, base), torch.device("cpu"))]
        print(f"{method}: losses {args.loss_names}, {n_params / 1e6:.2f}M trained parameters, optimizer "
              f"{args.optimizer}")
    results: Dict[str, Dict[str, float]] = {}
    for impl in (("plain", "fused") if opt.adam == "both" else (opt.adam,)):
        times: Dict[str, List[float]] = {m: [] for m in opt.methods}
        optimizers = {m: build_optimizer(a.replace(fused_optimizer=impl == "fused"), model)
                      for m, (a, model, _) in parts.items()}
        for i in range(opt.warmup + opt.runs):
            for method, (_, model, batch) in parts.items():
                t0 = clock()
                train_step(model, batch, optimizers[method])
                if i >= opt.warmup:
                    times[method].append(clock() - t0)
        print(f"--- optimizers: {impl}")
        med = {m: statistics.median(t) for m, t in times.items()}
        for method in opt.methods:
            print(f"{method:6}: median {med[method] * 1e3:8.1f} ms/step  {opt.batch_size / med[method]:8.1f} "
                  f"samples/s  (runs: " + ", ".join(f"{t * 1e3:.0f}" for t in times[method]) + " ms)")
        first = opt.methods[0]
        for method in opt.methods[1:]:
            print(f"step time {method}/{first} ({impl}): {med[method] / med[first]:.2f}x")
        results[impl] = med
    return results


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
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="time these methods' training steps against each other (e.g. irra tbps) instead of IRRA's "
                        "fast path against the original computation")
    p.add_argument("--simclr_mlp", type=int, nargs=3, default=(128, 32, 128),
                   help="TBPS's SS head IN HIDDEN OUT (IN = the backbone's embedding width; configs/tbps_demo.yaml's)")
    opt = p.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    torch.manual_seed(0)
    clock = time.perf_counter if opt.clock == "wall" else time.process_time
    if opt.methods:
        print(f"arch {opt.arch}, bs {opt.batch_size}, img {tuple(opt.img_size)}, text_length {opt.text_length}, "
              f"threads {torch.get_num_threads()}, clock {opt.clock}, adam {opt.adam}")
        compare_methods(opt, clock)
        return

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
