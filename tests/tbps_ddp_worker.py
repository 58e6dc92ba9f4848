"""One TBPS-CLIP forward/backward on the fixture batch (tests/fixtures/tbps), in one process or as one rank of a
gloo group (used by tests/test_tbps_ddp.py; a module of its own so that ``torch.multiprocessing.spawn`` imports it).
"""
from __future__ import annotations

import os
from typing import Dict

import torch
import torch.distributed as dist

from methods.tbps.checkpoint import arch_from_state_dict, load_tbps_weights, read_tbps_checkpoint
from methods.tbps.model import TBPS, TBPSLossConfig, sum_losses
from model.tbps_model import tokenize

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "tbps")
ALPHA = 0.5


def global_batch() -> Dict[str, torch.Tensor]:
    b = torch.load(os.path.join(HERE, "tbps_model.pt"), weights_only=True)["batch"]
    return {"image": b["image"], "aug1": b["aug1"], "aug_ss_1": b["aug_ss_1"], "aug_ss_2": b["aug_ss_2"],
            "caption_ids": tokenize(b["caption"], 77), "id": b["id"]}


def rank_slice(batch: Dict[str, torch.Tensor], rank: int, world: int) -> Dict[str, torch.Tensor]:
    n = batch["id"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def run(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Losses and the gradients of every trainable parameter after one backward."""
    ret = model(batch, ALPHA)
    sum_losses(ret).backward()
    inner = model.module if hasattr(model, "module") else model
    return {"losses": {k: v.detach() for k, v in ret.items()},
            "grads": {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.requires_grad}}


def build() -> TBPS:
    sd = read_tbps_checkpoint(os.path.join(HERE, "tbps_checkpoint.pth"))
    model = TBPS(arch_from_state_dict(sd, (64, 32), head_width=32), TBPSLossConfig(id=True), dropout=0.0)
    load_tbps_weights(model, sd)
    return model.train()


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(build())
        torch.save(run(ddp, rank_slice(global_batch(), rank, world)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
