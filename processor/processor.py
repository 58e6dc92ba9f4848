"""Training loop and inference (the original's ``do_train`` / ``do_inference``, made robust).

What changed from the original, behaviour otherwise identical:
- the device is the model's, never hard-coded; AMP (``--precision amp_bf16|amp_fp16``) is optional;
- a non-finite loss stops training loudly (epoch, iteration and every loss term in the message), and a checkpoint is
  written only while every parameter is finite, so the last good one is kept;
- ``last.pth`` is written every epoch (model, optimizer, scheduler, epoch, best R1, and the GradScaler state with
  ``amp_fp16``) next to ``best.pth``, and every evaluation is appended to ``metrics.jsonl``; resuming continues at
  the next epoch;
- each epoch starts from seeds derived from ``(seed, epoch, rank)`` (the data's randomness from ``(seed, epoch,
  sample index)``, see datasets/build.py), so a resumed run repeats an uninterrupted one: no RNG state is saved.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Dict, Optional, Sequence, Tuple

import torch

from datasets.build import set_train_epoch
from methods.base import TrainHook, TrainState
from methods.rde.ccd import split_prob  # noqa: F401  (RDE's name where RDE's processor/processor.py has it)
from methods.registry import get_method
from processor.setup import set_seed
from utils.cli import Interrupted, as_interrupted, interrupts_deferred
from utils.comm import autocast_context, get_rank, get_world_size, is_main_process, reduce_dict, unwrap_model
from utils.meter import AverageMeter
from utils.metrics import Evaluator
from utils.run_dir import CONFIG_FILE, LAST_CHECKPOINT, append_metrics, drop_metrics_from

# Offsets that separate the per-epoch seeds of different epochs and ranks.
EPOCH_SEED_STRIDE = 1000
RANK_SEED_STRIDE = 100003

logger = logging.getLogger("IRRA.train")


def check_finite_loss(stats: Dict[str, float], epoch: int, n_iter: int) -> None:
    """Stop on a non-finite total loss. ``stats`` are averaged over ranks, so a NaN on any rank stops every rank."""
    if not math.isfinite(stats["loss"]):
        terms = ", ".join(f"{k}={v:.6g}" for k, v in stats.items() if "loss" in k and k != "loss")
        raise FloatingPointError(
            f"non-finite loss at epoch {epoch}, iteration {n_iter + 1}: total={stats['loss']:.6g} ({terms}). "
            "Training stopped; the last good checkpoint (last.pth / best.pth) is kept. Try a lower --lr, "
            "--precision fp32, or check the data of this batch.")


def nonfinite_parameters(model: torch.nn.Module) -> list:
    """Names of the parameters that hold a NaN or an infinity."""
    return [n for n, p in unwrap_model(model).named_parameters() if not bool(torch.isfinite(p).all())]


def optimizer_step_count(optimizer: torch.optim.Optimizer) -> Optional[int]:
    """How many steps the optimizer has taken (the largest per-parameter ``step`` of Adam/AdamW; None for an optimizer
    without a step count, such as SGD). A step that a GradScaler skips does not count."""
    if not all("betas" in g for g in optimizer.param_groups):  # SGD: keeps no step count
        return None
    steps = [st["step"] for st in optimizer.state.values() if "step" in st]
    return int(max(float(t) for t in steps)) if steps else 0


def prepare_batch(model, batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, object]:
    """The loader's batch (on the host) -> the step's: the model's data-dependent lengths computed here on the host
    (``IRRA.host_lengths``: Python ints, so the step needs no device-to-host copy), the tensors copied to ``device``
    (``non_blocking``: asynchronous from the loader's pinned memory)."""
    host = getattr(unwrap_model(model), "host_lengths", None)
    lengths = host(batch) if host is not None else {}
    return {**{k: v.to(device, non_blocking=True) for k, v in batch.items()}, **lengths}


def train_step(model, batch: Dict[str, object], optimizer: torch.optim.Optimizer,
               scaler: Optional[torch.amp.GradScaler] = None, precision: str = "fp32",
               free_grads_first: bool = True) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """One optimisation step on a batch from :func:`prepare_batch`: forward (autocast for the AMP ``precision``), the
    sum of the losses, backward (scaled by ``scaler`` for amp_fp16), optimizer step. Returns (the model's outputs,
    the total loss), on the device: nothing is copied to the host here (the model's fast path reads its lengths
    from the batch; a GradScaler's step reads whether the gradients are finite, amp_fp16 only).

    ``free_grads_first`` (default, the trainer's order) frees the previous step's gradients before the forward:
    same numbers, lower peak memory; False is the original's order (gradients freed after the forward, so they are
    alive during it)."""
    device = next(unwrap_model(model).parameters()).device
    if free_grads_first:
        optimizer.zero_grad(set_to_none=True)
    with autocast_context(precision, device):
        ret = model(batch)
    total_loss = sum(v for k, v in ret.items() if "loss" in k)
    if not free_grads_first:
        optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total_loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total_loss.backward()
        optimizer.step()
    return ret, total_loss


def train_one_epoch(args, model, train_loader, optimizer, scaler: Optional[torch.amp.GradScaler],
                    epoch: int, hooks: Sequence[TrainHook] = (), state: Optional[TrainState] = None
                    ) -> Tuple[Dict[str, AverageMeter], Dict[str, torch.Tensor], int]:
    """One pass over ``train_loader``; returns (meters of every loss/accuracy, the last step's outputs, samples).

    The method's ``hooks`` see every batch before its step (``before_step``: they may add keys) and the outputs after
    it (``after_step``); ``state`` (the run's :class:`TrainState`) gives them the iteration, and its ``train_mode``
    the mode the model trains in."""
    device = next(model.parameters()).device
    meters: Dict[str, AverageMeter] = {"loss": AverageMeter()}  # then each loss / accuracy, as they come
    model.train(state.train_mode if state is not None else True)
    n_iter, num_samples, ret = -1, 0, {}
    steps_before = optimizer_step_count(optimizer) if scaler is not None else None
    for n_iter, batch in enumerate(train_loader):
        batch = prepare_batch(model, batch, device)
        if state is not None:
            state.iteration = n_iter
        for hook in hooks:
            batch = hook.before_step(state, batch)
        ret, total_loss = train_step(model, batch, optimizer, scaler, args.precision)
        for hook in hooks:
            hook.after_step(state, ret)
        # every loss / accuracy, averaged over ranks under DDP, copied to the host at once (one sync per step,
        # after the whole step is queued)
        stats = reduce_dict({"loss": total_loss.detach(),
                             **{k: v.detach() for k, v in ret.items() if "loss" in k or "acc" in k}})
        stats = dict(zip(stats, torch.stack([v.float().reshape(()) for v in stats.values()]).tolist()))
        check_finite_loss(stats, epoch, n_iter)
        batch_size = batch["images"].shape[0]
        num_samples += batch_size
        for k, v in stats.items():
            meters.setdefault(k, AverageMeter()).update(v, batch_size)

        if (n_iter + 1) % args.log_period == 0:
            logger.info("Epoch[%d] Iteration[%d/%d]%s, Base Lr: %.2e", epoch, n_iter + 1, len(train_loader),
                        "".join(f", {k}: {m.avg:.4f}" for k, m in meters.items()), optimizer.param_groups[0]["lr"])
    if n_iter < 0:
        raise RuntimeError(f"the train loader yielded no batch in epoch {epoch} "
                           f"(--batch_size {args.batch_size} larger than the training set?)")
    if scaler is not None:  # amp_fp16: say how many steps the GradScaler skipped (inf/NaN in the scaled gradients)
        steps_after = optimizer_step_count(optimizer)
        skipped = (f"{n_iter + 1 - (steps_after - steps_before)} of {n_iter + 1} steps skipped (inf/NaN gradients), "
                   if steps_before is not None and steps_after is not None else "")
        logger.info("Epoch[%d] GradScaler: %sscale now %g", epoch, skipped, scaler.get_scale())
    return meters, ret, num_samples


def evaluate_and_checkpoint(args, model, evaluator: Evaluator, checkpointer, epoch: int, best_top1: float,
                            best_epoch: Optional[int], tb_writer=None) -> Tuple[float, Optional[int]]:
    """Evaluate (every rank takes part), record the metrics, save ``best.pth`` on a new best R1; returns the best."""
    logger.info("Validation Results - Epoch: %d", epoch)
    metrics = evaluator.eval(unwrap_model(model).eval(), i2t_metric=args.i2t_metric)
    model.train()
    if is_main_process():
        append_metrics(args.output_dir, {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}})
        if tb_writer is not None:
            for k, v in metrics.items():
                tb_writer.add_scalar(f"val/{k}", float(v), epoch)
    if metrics["R1"] > best_top1:
        best_top1, best_epoch = float(metrics["R1"]), epoch
        save_checkpoint(checkpointer, model, "best", epoch=epoch, best_top1=best_top1, best_epoch=best_epoch)
    return best_top1, best_epoch


def save_checkpoint(checkpointer, model, name: str, **extra) -> None:
    """``checkpointer.save(name, **extra)``, refused (FloatingPointError) while a parameter is not finite."""
    bad = nonfinite_parameters(model)
    if bad:
        raise FloatingPointError(f"{len(bad)} parameter tensor(s) hold NaN/inf (e.g. {bad[:3]}): {name}.pth was not "
                                 f"written, the last good checkpoint is kept. Try a lower --lr or --precision fp32.")
    checkpointer.save(name, **extra)


def do_train(start_epoch: int, args, model, train_loader, evaluator: Evaluator, optimizer, scheduler, checkpointer,
             best_top1: float = 0.0, best_epoch: Optional[int] = None, tb_writer=None,
             scaler_state: Optional[dict] = None) -> Dict[str, object]:
    """Train epochs ``start_epoch..args.num_epoch`` (1-based, as the original; ``--stop_epoch`` stops earlier);
    returns the best R1 and its epoch. ``scaler_state``: the GradScaler state of a resumed amp_fp16 run."""
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp_fp16" else None
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    last_epoch = min(args.num_epoch, args.stop_epoch or args.num_epoch)
    logger.info("start training")
    hooks = get_method(args.method).train_hooks(args)
    state = TrainState(args, model, optimizer, scheduler, train_loader, args.output_dir, start_epoch=start_epoch,
                       iters_per_epoch=len(train_loader))
    if is_main_process():
        drop_metrics_from(args.output_dir, start_epoch)  # epochs redone on resume
        if tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter
            tb_writer = SummaryWriter(log_dir=args.output_dir)

    counted = _CountingLoader(train_loader)  # its count names the iteration an interruption stopped
    epoch, finished = start_epoch, start_epoch - 1
    try:
        for hook in hooks:
            hook.before_train(state)
        for epoch in range(start_epoch, last_epoch + 1):
            set_seed(args.seed + epoch * EPOCH_SEED_STRIDE + get_rank() * RANK_SEED_STRIDE)
            set_train_epoch(train_loader, epoch)
            state.epoch, state.iteration, state.train_mode = epoch, 0, True
            for hook in hooks:
                hook.before_epoch(state)
            start_time = time.time()
            lr = optimizer.param_groups[0]["lr"]
            meters, ret, num_samples = train_one_epoch(args, model, counted, optimizer, scaler, epoch, hooks, state)
            scheduler.step()
            for hook in hooks:
                hook.after_epoch(state)
            _log_epoch(epoch, meters, ret, lr, num_samples, time.time() - start_time, len(train_loader), tb_writer)
            if epoch % args.eval_period == 0:
                best_top1, best_epoch = evaluate_and_checkpoint(args, model, evaluator, checkpointer, epoch,
                                                                best_top1, best_epoch, tb_writer)
            extra = {"scaler": scaler.state_dict()} if scaler is not None else {}
            with interrupts_deferred():  # a signal during the write waits for it: the epoch is kept
                save_checkpoint(checkpointer, model, "last", epoch=epoch, best_top1=best_top1,
                                best_epoch=best_epoch, **extra)
            finished, counted.count = epoch, 0
            if device.type != "cpu":
                torch.accelerator.empty_cache()
    except BaseException as err:  # KeyboardInterrupt or utils.cli.Interrupted: report, stop; others: re-raised
        stop = as_interrupted(err)
        if stop is None and isinstance(err, RuntimeError) and "killed by signal: Terminated" in str(err):
            stop = Interrupted(signal.SIGTERM)  # a job's SIGTERM reached the loader workers before this process
        if stop is None:
            raise
        _report_interruption(stop, args, epoch, finished, counted)
        raise stop from None

    if tb_writer is not None:
        tb_writer.flush()
    logger.info("best R1: %s at epoch %s", best_top1, best_epoch)
    return {"best_top1": best_top1, "best_epoch": best_epoch}


class _CountingLoader:
    """``loader`` as ``train_one_epoch`` uses it (iteration, ``len``), counting the batches handed out this pass."""

    def __init__(self, loader) -> None:
        self.loader, self.count = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.count = 0
        for batch in self.loader:
            self.count += 1
            yield batch


def resume_command(run_dir: str) -> str:
    """The command that continues the run in ``run_dir`` from its ``last.pth`` (shell-quoted)."""
    import shlex

    return (f"python train.py --config {shlex.quote(os.path.join(run_dir, CONFIG_FILE))} --resume "
            f"--resume_ckpt_file {shlex.quote(os.path.join(run_dir, LAST_CHECKPOINT))}")


def _report_interruption(stop, args, epoch: int, finished: int, counted: _CountingLoader) -> None:
    """Log the one line of an interrupted training: where it stopped, the epoch last.pth holds, how to resume."""
    from utils.checkpoint import read_checkpoint

    last = os.path.join(args.output_dir, LAST_CHECKPOINT)
    held = None
    if os.path.isfile(last):
        try:
            held = read_checkpoint(last).get("epoch")  # memory-mapped: cheap even for a large model
        except Exception:  # noqa: BLE001 - only the message depends on it
            held = "unknown"
    where = (f"in epoch {epoch}, iteration {counted.count}/{len(counted)}" if counted.count
             else f"after epoch {finished}" if finished >= 1 else "before the first iteration")
    if held is None:
        saved = "no last.pth yet (no epoch finished): nothing to resume, start the training again"
    else:
        saved = f"last.pth holds epoch {held}; resume with: {resume_command(args.output_dir)}"
    if is_main_process():
        logger.warning("%s %s; %s", stop, where, saved)
    stop.reported = True


def do_inference(model, test_img_loader, test_txt_loader, i2t_metric: bool = False, method=None,
                 metrics: Sequence[str] = ()) -> Dict[str, float]:
    """Evaluate ``model`` on the test loaders (``method``: its feature sets, see ``Evaluator``; ``metrics``: the
    Evaluator's extra metrics); logs the table and returns the metrics dict."""
    logging.getLogger("IRRA.test").info("Enter inferencing")
    evaluator = Evaluator(test_img_loader, test_txt_loader, split="test", method=method, metrics=metrics)
    return evaluator.eval(unwrap_model(model).eval(), i2t_metric=i2t_metric)


def _log_epoch(epoch: int, meters: Dict[str, AverageMeter], ret: Dict[str, torch.Tensor], lr: float,
               num_samples: int, elapsed: float, num_batches: int, tb_writer) -> None:
    if tb_writer is not None:
        tb_writer.add_scalar("lr", lr, epoch)
        tb_writer.add_scalar("temperature", float(ret["temperature"]), epoch)
        for k, m in meters.items():
            tb_writer.add_scalar(k, m.avg, epoch)
    logger.info("Epoch %d done. Time per batch: %.3f[s] Speed: %.1f[samples/s] Lr: %.2e %s", epoch,
                elapsed / num_batches, num_samples * get_world_size() / elapsed, lr,
                ", ".join(f"{k}: {m.avg:.4f}" for k, m in meters.items()))


__all__ = ["do_train", "do_inference", "train_one_epoch", "train_step", "prepare_batch", "evaluate_and_checkpoint",
           "autocast_context"]
