"""Train IRRA.  Single process:  python train.py --config configs/cuhk_pedes.yaml
DDP:  torchrun --nproc_per_node N train.py ...   (NCCL on GPUs, gloo on CPU)
"""
import os
import sys

import torch

from datasets import build_dataloader
from model.build import build_model
from processor.processor import do_train, make_run_dir, set_rng_state, set_seed
from solver import build_lr_scheduler, build_optimizer
from utils.checkpoint import Checkpointer
from utils.comm import get_rank, get_world_size, init_distributed
from utils.iotools import save_train_configs
from utils.logger import setup_logger
from utils.metrics import Evaluator
from utils.options import get_args, warn_config_changes


def main(argv=None) -> dict:
    args = get_args(argv)
    if not args.training:
        raise ValueError("--test evaluates: use test.py --config_file <run>/configs.yaml")
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))  # torch.distributed.launch passes --local_rank
    device = init_distributed(args.device)
    args.distributed = get_world_size() > 1
    set_seed(args.seed + get_rank())
    args.output_dir = make_run_dir(args)
    logger = setup_logger("IRRA", save_dir=args.output_dir, if_train=True, distributed_rank=get_rank())
    logger.info(f"Using {get_world_size()} process(es) on {device}; run dir {args.output_dir}")
    logger.info("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    if get_rank() == 0:
        if args.resume:
            warn_config_changes(args, os.path.join(args.output_dir, "configs.yaml"), logger)
        else:
            save_train_configs(args.output_dir, args)

    train_loader, val_img_loader, val_txt_loader, num_classes = build_dataloader(args)
    model = build_model(args, num_classes, device=device)
    logger.info(f"Total params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    model.to(device)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None)
    optimizer = build_optimizer(args, model)
    scheduler = build_lr_scheduler(args, optimizer)
    checkpointer = Checkpointer(model, optimizer, scheduler, args.output_dir, save_to_disk=get_rank() == 0)
    evaluator = Evaluator(val_img_loader, val_txt_loader)

    start_epoch, best_top1, best_epoch = 1, 0.0, None
    if args.resume:
        ckpt = checkpointer.resume(args.resume_ckpt_file)
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        start_epoch = int(ckpt["epoch"]) + 1  # the original restarted the saved epoch
        best_top1, best_epoch = float(ckpt.get("best_top1", 0.0)), ckpt.get("best_epoch")
        logger.info(f"Resumed from {args.resume_ckpt_file}: continuing at epoch {start_epoch}")

    result = do_train(start_epoch, args, model, train_loader, evaluator, optimizer, scheduler, checkpointer,
                      best_top1=best_top1, best_epoch=best_epoch)
    return {"run_dir": args.output_dir, **result}


if __name__ == "__main__":
    main(sys.argv[1:])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
