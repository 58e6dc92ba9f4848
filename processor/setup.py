"""Setting up a training run: seeding, the run directory, and every part ``do_train`` needs, built from the options.

``train.py`` is ``args = get_args(argv)`` followed by :func:`build_training` and ``do_train``.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from datasets import build_dataloader
from datasets.bases import measured_noisy_rate
from methods.registry import get_method
from model.build import build_model
from solver import build_optimizer
from utils.checkpoint import Checkpointer, OptimizerStateError
from utils.choices import eval_metrics
from utils.comm import broadcast_object, get_rank, get_world_size, init_distributed, is_main_process
from utils.env import describe_environment, environment_info
from utils.iotools import check_output_dir, make_output_dir, save_train_configs
from utils.logger import setup_logger
from utils.metrics import Evaluator
from utils.options import warn_config_changes
from utils.run_dir import CONFIG_FILE, SETUP_FILES
from utils.run_lock import RunLock



def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


_CREATED_PARENTS: Dict[str, List[str]] = {}  # run dir -> the parents make_run_dir created for it (deepest first)


def _missing_parents(path: str) -> List[str]:
    """The ancestors of ``path`` that do not exist yet, deepest first."""
    out, parent = [], os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        out.append(parent)
        parent = os.path.dirname(parent)
    return out


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
        created = _missing_parents(base)
        check_output_dir(args.output_dir, "--output_dir")  # a file in the way or a read-only folder: named
        while True:
            try:
                make_output_dir(path, "--output_dir", exist_ok=False)
                break
            except FileExistsError:
                path, i = f"{base}_{i}", i + 1
        _CREATED_PARENTS[os.path.abspath(path)] = created
    return broadcast_object(path)


def remove_failed_run_dir(run_dir: str, logger: logging.Logger) -> None:
    """Remove a run directory whose setup failed, if it holds nothing but :data:`SETUP_FILES` (rank 0 only)."""
    if not is_main_process() or not os.path.isdir(run_dir):
        return
    if set(os.listdir(run_dir)) <= set(SETUP_FILES):
        for h in list(logger.handlers):  # release train_log.txt
            if isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
                h.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in _CREATED_PARENTS.pop(os.path.abspath(run_dir), []):  # e.g. logs/<dataset>/, if still empty
            try:
                os.rmdir(parent)
            except OSError:
                break
        logger.error("setup failed: removed the new run directory %s", run_dir)


@dataclass
class TrainingParts:
    """Everything ``do_train`` takes, built by :func:`build_training`."""

    args: Any
    device: torch.device
    model: torch.nn.Module
    train_loader: Any
    evaluator: Evaluator
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpointer: Checkpointer
    run_lock: RunLock = RunLock(None)  # held by rank 0 while it trains in the run directory (release when done)
    start_epoch: int = 1
    best_top1: float = 0.0
    best_epoch: Optional[int] = None
    scaler_state: Optional[dict] = None


def build_training(args) -> TrainingParts:
    """Join the process group, make the run directory, log and save the options, build data, model, optimizer,
    scheduler, checkpointer and evaluator, and resume when asked. A failure before training starts removes the new
    run directory (the error stays on the console).

    Rank 0 takes the run directory's lock (``utils.run_lock.RunLock``) before it writes anything there: a second
    process training or resuming in the same run stops at once (``RunLockedError``). The returned parts hold it in
    ``run_lock``; release it when training ends (``with parts.run_lock:``), or the process's end does."""
    device = init_distributed(args.device)
    set_seed(args.seed + get_rank())
    # the run's state beside its options (saved in configs.yaml; ignored when that file starts a new run)
    args = args.replace(distributed=get_world_size() > 1, output_dir=make_run_dir(args),
                        environment=environment_info(device))
    lock = RunLock(args.output_dir if is_main_process() else None).acquire()
    try:
        logger = setup_logger("IRRA", save_dir=args.output_dir, if_train=True, distributed_rank=get_rank())
    except BaseException:
        lock.release()
        raise
    try:
        parts = _build(args, device, logger)
    except BaseException:
        lock.release()
        if not args.resume:
            remove_failed_run_dir(args.output_dir, logger)
        raise
    parts.run_lock = lock
    return parts


def _build(args, device: torch.device, logger: logging.Logger) -> TrainingParts:
    logger.info("environment: %s", describe_environment(args.environment))
    logger.info("Using %d process(es) on %s; run dir %s", get_world_size(), device, args.output_dir)
    logger.info("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))

    train_loader, val_img_loader, val_txt_loader, num_classes = build_dataloader(args)
    if args.noisy_rate > 0:  # the noise rate the training pairs really have (a --noisy_file may not match
        # --noisy_rate): saved in configs.yaml, ignored when that file is reused, as the environment
        args = args.replace(noisy_rate_measured=measured_noisy_rate(train_loader.dataset.real_correspondences))
    if is_main_process():
        if args.resume:
            warn_config_changes(args, os.path.join(args.output_dir, CONFIG_FILE), logger)
        else:
            save_train_configs(args.output_dir, args)
    model = build_model(args, num_classes, device=device)
    logger.info("Total params: %.2fM", sum(p.numel() for p in model.parameters()) / 1e6)
    model.to(device)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None)
    method = get_method(args.method)
    optimizer = build_optimizer(args, model)
    scheduler = method.build_lr_scheduler(args, optimizer, len(train_loader))
    checkpointer = Checkpointer(model, optimizer, scheduler, args.output_dir, save_to_disk=is_main_process())
    evaluator = Evaluator(val_img_loader, val_txt_loader, split=args.val_dataset, method=method,
                          metrics=eval_metrics(args.metrics, args.dataset_name))
    parts = TrainingParts(args, device, model, train_loader, evaluator, optimizer, scheduler, checkpointer)
    if args.resume:
        ckpt = resume_checkpoint(checkpointer, args.resume_ckpt_file)
        parts.start_epoch = int(ckpt["epoch"]) + 1  # the original restarted the saved epoch
        parts.best_top1, parts.best_epoch = float(ckpt.get("best_top1", 0.0)), ckpt.get("best_epoch")
        parts.scaler_state = ckpt.get("scaler")
        logger.info("Resumed from %s: continuing at epoch %d", args.resume_ckpt_file, parts.start_epoch)
    return parts


def resume_checkpoint(checkpointer: Checkpointer, f: str) -> Dict[str, Any]:
    """``checkpointer.resume(f)`` (model, optimizer, scheduler; returns the extra entries). A saved optimizer state
    that does not fit names the options that decide the optimizer's layout (solver/build.py)."""
    try:
        return checkpointer.resume(f)
    except OptimizerStateError as e:
        raise OptimizerStateError(
            f"{e}. Resume with the options it was saved with (--optimizer, --merge_param_groups or "
            f"--no-merge_param_groups (the original's one group per parameter), the model's trainable parameters)"
        ) from e
