"""Train IRRA.  Single process:  python train.py --config configs/cuhk_pedes.yaml
DDP:  torchrun --nproc_per_node N train.py ...   (NCCL on GPUs, gloo on CPU; --batch_size is the global batch)
--debug (or IRRA_DEBUG=1): the traceback of an expected error too. Ctrl-C / SIGTERM: one line saying how to resume,
exit code 130 / 143 (utils/cli.py).
"""
import os
import sys

import torch

from processor.processor import do_train
from processor.setup import build_training
from utils.cli import run_main
from utils.options import get_args


def main(argv=None) -> dict:
    args = get_args(argv)
    if not args.training:
        raise ValueError("--test evaluates: use test.py --config_file <run>/configs.yaml")
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))  # torch.distributed.launch passes --local_rank
    p = build_training(args)
    with p.run_lock:  # one writer per run directory, released when training ends (kill -9: by the kernel)
        result = do_train(p.start_epoch, p.args, p.model, p.train_loader, p.evaluator, p.optimizer, p.scheduler,
                          p.checkpointer, best_top1=p.best_top1, best_epoch=p.best_epoch, scaler_state=p.scaler_state)
    return {"run_dir": p.args.output_dir, **result}


def _cli(argv) -> dict:
    try:
        return main(argv)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(_cli, sys.argv[1:], prog="train.py", handle_signals=True)
