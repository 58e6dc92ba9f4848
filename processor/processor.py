"""Training loop and inference (the original's ``do_train`` / ``do_inference``, made robust).

What changed from the original, behaviour otherwise identical:
- the device is the model's, never hard-coded; AMP (``--precision amp_bf16|amp_fp16``) is optional;
- a non-finite loss stops training loudly (epoch, iteration and every loss term in the message);
- ``last.pth`` is written every epoch (model, optimizer, scheduler, epoch, best R1, RNG states) next to ``best.pth``,
  and every evaluation is appended to ``metrics.jsonl``; resuming continues at the next epoch;
- each epoch starts from RNG states derived from ``(seed, epoch, rank)``, so a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from typing import Dict, Optional

import numpy as np
import torch

from utils.comm import broadcast_object, get_rank, get_world_size, is_main_process, reduce_dict
from utils.meter import AverageMeter
from utils.metrics import Evaluator

# Offsets that separate the per-epoch seeds of different epochs and ranks.
EPOCH_SEED_STRIDE = 1000
RANK_SEED_STRIDE = 100003


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> Dict[str, object]:
    """RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: Dict[str, object]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def autocast_context(precision: str, device: torch.device):
    """``torch.autocast`` for the AMP precisions, a no-op context otherwise."""
    if precision == "amp_bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "amp_fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def make_run_dir(args) -> str:
    """``<output_dir>/<dataset_name>/<YYYYmmdd_HHMMSS>_<name>``, created fresh (never an existing one) on rank 0 and
    shared with the other ranks. With ``--resume`` the run continues in the checkpoint's directory."""
    if args.resume:
        if not args.resume_ckpt_file or not os.path.isfile(args.resume_ckpt_file):
            raise FileNotFoundError(f"--resume needs --resume_ckpt_file pointing to a checkpoint (e.g. "
                                    f"logs/<dataset>/<run>/last.pth); got {args.resume_ckpt_file!r}")
        return os.path.dirname(os.path.abspath(args.resume_ckpt_file))
    path = None
    if is_main_process():
        stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
        base = os.path.join(args.output_dir, args.dataset_name, f"{stamp}_{args.name}")
        path, i = base, 1
        while True:
            try:
                os.makedirs(path, exist_ok=False)
                break
            except FileExistsError:
                path, i = f"{base}_{i}", i + 1
    return broadcast_object(path)


def _set_sampler_epoch(loader, epoch: int) -> None:
    for s in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if s is not None and hasattr(s, "set_epoch"):
            s.set_epoch(epoch)


def _check_finite(stats: Dict[str, float], epoch: int, n_iter: int) -> None:
    """Stop on a non-finite total loss. ``stats`` are averaged over ranks, so a NaN on any rank stops every rank."""
    if not math.isfinite(stats["loss"]):
        terms = ", ".join(f"{k}={v:.6g}" for k, v in stats.items() if "loss" in k and k != "loss")
        raise FloatingPointError(
            f"non-finite loss at epoch {epoch}, iteration {n_iter + 1}: total={stats['loss']:.6g} ({terms}). "
            "Training stopped; the last good checkpoint (last.pth / best.pth) is kept. Try a lower --lr, "
            "--precision fp32, or check the data of this batch.")


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def do_train(start_epoch: int, args, model, train_loader, evaluator: Evaluator, optimizer, scheduler, checkpointer,
             best_top1: float = 0.0, best_epoch: Optional[int] = None, tb_writer=None) -> Dict[str, object]:
    """Train epochs ``start_epoch..args.num_epoch`` (1-based, as the original); returns best R1 and its epoch."""
    logger = logging.getLogger("IRRA.train")
    device = next(model.parameters()).device
    precision = getattr(args, "precision", "auto")
    scaler = None
    if precision == "amp_fp16":
        scaler = torch.amp.GradScaler(device.type)
    run_dir = args.output_dir
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    last_epoch = min(args.num_epoch, getattr(args, "stop_epoch", None) or args.num_epoch)
    seed = getattr(args, "seed", 1)
    rank = get_rank()
    logger.info("start training")

    if tb_writer is None and is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        tb_writer = SummaryWriter(log_dir=run_dir)

    for epoch in range(start_epoch, last_epoch + 1):
        set_seed(seed + epoch * EPOCH_SEED_STRIDE + rank * RANK_SEED_STRIDE)
        _set_sampler_epoch(train_loader, epoch)
        meters: Dict[str, AverageMeter] = {"loss": AverageMeter()}  # then each loss / accuracy, as they come
        model.train()
        start_time = time.time()
        n_iter, num_samples, ret = -1, 0, {}
        for n_iter, batch in enumerate(train_loader):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast_context(precision, device):
                ret = model(batch)
            total_loss = sum(v for k, v in ret.items() if "loss" in k)
            # every loss / accuracy, averaged over ranks under DDP, copied to the host at once (one sync per step)
            stats = reduce_dict({"loss": total_loss.detach(),
                                 **{k: v.detach() for k, v in ret.items() if "loss" in k or "acc" in k}})
            stats = dict(zip(stats, torch.stack([v.float().reshape(()) for v in stats.values()]).tolist()))
            _check_finite(stats, epoch, n_iter)

            batch_size = batch["images"].shape[0]
            num_samples += batch_size
            for k, v in stats.items():
                meters.setdefault(k, AverageMeter()).update(v, batch_size)

            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(total_loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                total_loss.backward()
                optimizer.step()

            if (n_iter + 1) % args.log_period == 0:
                info = f"Epoch[{epoch}] Iteration[{n_iter + 1}/{len(train_loader)}]"
                info += "".join(f", {k}: {m.avg:.4f}" for k, m in meters.items())
                info += f", Base Lr: {scheduler.get_last_lr()[0]:.2e}"
                logger.info(info)
        if n_iter < 0:
            raise RuntimeError(f"the train loader yielded no batch in epoch {epoch} "
                               f"(--batch_size {args.batch_size} larger than the training set?)")

        lr = scheduler.get_last_lr()[0]
        if tb_writer is not None:
            tb_writer.add_scalar("lr", lr, epoch)
            tb_writer.add_scalar("temperature", float(ret["temperature"]), epoch)
            for k, m in meters.items():
                tb_writer.add_scalar(k, m.avg, epoch)
        scheduler.step()
        elapsed = time.time() - start_time
        logger.info(f"Epoch {epoch} done. Time per batch: {elapsed / (n_iter + 1):.3f}[s] "
                    f"Speed: {num_samples * get_world_size() / elapsed:.1f}[samples/s] Lr: {lr:.2e} "
                    + ", ".join(f"{k}: {m.avg:.4f}" for k, m in meters.items()))

        if epoch % args.eval_period == 0:
            logger.info(f"Validation Results - Epoch: {epoch}")
            # every rank takes part (sharded encoding); all get the same metrics back
            metrics = evaluator.eval(unwrap(model).eval(), i2t_metric=getattr(args, "i2t_metric", False))
            model.train()
            if is_main_process():
                _append_jsonl(metrics_path, {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}})
                if tb_writer is not None:
                    for k, v in metrics.items():
                        tb_writer.add_scalar(f"val/{k}", float(v), epoch)
            if metrics["R1"] > best_top1:
                best_top1, best_epoch = float(metrics["R1"]), epoch
                checkpointer.save("best", epoch=epoch, best_top1=best_top1, best_epoch=best_epoch)
        checkpointer.save("last", epoch=epoch, best_top1=best_top1, best_epoch=best_epoch, rng=rng_state())
        if device.type != "cpu":
            torch.accelerator.empty_cache()

    if tb_writer is not None:
        tb_writer.flush()
    logger.info(f"best R1: {best_top1} at epoch {best_epoch}")
    return {"best_top1": best_top1, "best_epoch": best_epoch}


def do_inference(model, test_img_loader, test_txt_loader, i2t_metric: bool = False) -> Dict[str, float]:
    """Evaluate ``model`` on the test loaders; logs the table and returns the metrics dict."""
    logger = logging.getLogger("IRRA.test")
    logger.info("Enter inferencing")
    evaluator = Evaluator(test_img_loader, test_txt_loader)
    return evaluator.eval(unwrap(model).eval(), i2t_metric=i2t_metric)


__all__ = ["do_train", "do_inference", "make_run_dir", "set_seed", "rng_state", "set_rng_state", "unwrap", "autocast_context"]
