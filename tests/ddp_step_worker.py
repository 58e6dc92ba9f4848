"""One optimizer step of a tiny IRRA, in one process or as one rank of a gloo group (used by
tests/test_ddp_equivalence.py; a module of its own so that ``torch.multiprocessing.spawn`` can import the worker).

The fixed global batch: 8 samples, pids with ids repeated across the two ranks' halves (so the global SDM / CMPM
labels have cross-rank positives), captions of different lengths, and an MLM mask with a different number of masked
tokens in each half (so the global MLM mean differs from the mean of the two rank means).
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from model.build import build_model
from solver import build_optimizer
from utils.options import default_args

GLOBAL_BATCH = 8
NUM_CLASSES = 5
MODEL_SEED = 123
PIDS = (0, 1, 2, 0, 3, 1, 2, 4)  # rank 0 gets the first half, rank 1 the second; ids 0, 1, 2 in both halves
CAPTION_LENGTHS = (5, 9, 7, 12, 6, 4, 10, 8)  # words between <|startoftext|> and <|endoftext|>
SOT, EOT, MASK = 49406, 49407, 49405
IMG_SIZE = (64, 32)
# AdamW's first step is lr * g / (|g| + eps): with the default eps (1e-8) it is lr * sign(g) wherever |g| >> 1e-8 and
# moves by up to lr / eps = 1e5 per unit of g near 0, so fp32 gradient noise (~1e-7 where g is ~0, e.g. the attention
# key biases, whose gradient is mathematically zero) becomes parameter differences of up to lr, even between two
# thread counts of one process. eps = lr keeps the step's sensitivity to the gradient at 1 (one process, 1 vs 2
# threads: 1.7e-6 apart; 7e-6 with eps 1e-4, 1e-3 with eps 1e-8); the AdamW code path is the same.
ADAMW_EPS = 1e-3

# name, loss_names, local_negatives, masked tokens per rank half
CONFIGS: List[Tuple[str, str, bool, Tuple[int, int]]] = [
    ("sdm+id+mlm", "sdm+id+mlm", False, (1, 6)),
    ("itc", "itc", False, (0, 0)),
    ("cmpm+mlm", "cmpm+mlm", False, (0, 5)),  # no masked token at all on rank 0
    ("local", "sdm+itc+cmpm+id+mlm", True, (2, 5)),
    ("tal", "tal", False, (0, 0)),  # RDE in eval mode (--rde_train_eval_mode)
    ("tal_train", "tal", False, (0, 0)),  # RDE in train mode: the TSE BatchNorm layers normalise over the global batch
]
EVAL_MODE_CONFIGS = ("tal",)  # the configs whose model is stepped in eval mode; all others in train mode


def model_args(loss_names: str, local_negatives: bool):
    """Options of the tiny IRRA (64 wide, 1 + 1 layers, 1 cross-modal block) and its AdamW."""
    return default_args(pretrain_choice="scratch:ViT-Micro", img_size=IMG_SIZE, loss_names=loss_names, cmt_depth=1,
                        device="cpu", precision="fp32", optimizer="AdamW", lr=1e-3, adamw_eps=ADAMW_EPS,
                        local_negatives=local_negatives)


def global_batch(mlm_counts: Sequence[int]) -> Dict[str, torch.Tensor]:
    """The fixed global batch; half r holds ``mlm_counts[r]`` masked tokens."""
    g = torch.Generator().manual_seed(7)
    images = torch.randn(GLOBAL_BATCH, 3, *IMG_SIZE, generator=g)
    caption_ids = torch.zeros(GLOBAL_BATCH, 77, dtype=torch.long)
    for i, n in enumerate(CAPTION_LENGTHS):
        words = torch.randint(1, MASK, (n,), generator=g)
        caption_ids[i, :n + 2] = torch.cat([torch.tensor([SOT]), words, torch.tensor([EOT])])
    mlm_ids, mlm_labels = caption_ids.clone(), torch.zeros_like(caption_ids)
    half = GLOBAL_BATCH // 2
    for r, count in enumerate(mlm_counts):
        # word positions (1..length) of the half's samples, in a fixed shuffled order
        slots = [(i, p) for i in range(r * half, (r + 1) * half) for p in range(1, CAPTION_LENGTHS[i] + 1)]
        for k in torch.randperm(len(slots), generator=g)[:count].tolist():
            i, p = slots[k]
            mlm_labels[i, p] = caption_ids[i, p]
            mlm_ids[i, p] = MASK
    assert [int((mlm_labels[r * half:(r + 1) * half] != 0).sum()) for r in range(2)] == list(mlm_counts)
    return {"images": images, "caption_ids": caption_ids, "pids": torch.tensor(PIDS), "mlm_ids": mlm_ids,
            "mlm_labels": mlm_labels}


def rank_slice(batch: Dict[str, torch.Tensor], rank: int, world: int) -> Dict[str, torch.Tensor]:
    """Rank ``rank``'s consecutive slice of the global batch (what the DDP samplers give it)."""
    per = GLOBAL_BATCH // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def losses_of(ret: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The losses and accuracies of a forward's output, as floats."""
    return {k: float(v.detach()) for k, v in ret.items() if "loss" in k or "acc" in k}


def build(loss_names: str, local_negatives: bool, train: bool = True):
    """(model in train or eval mode, options), the model's weights drawn from MODEL_SEED: the same in every process."""
    torch.manual_seed(MODEL_SEED)
    args = model_args(loss_names, local_negatives)
    model = build_model(args, NUM_CLASSES)
    model.train(train)
    return model, args


class CCDDataset(torch.utils.data.Dataset):
    """10 fixed training samples (dicts with "index", as RDE's train set) for CCD's per-sample loss pass."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> Dict[str, object]:
        g = torch.Generator().manual_seed(100 + i)
        caption = torch.zeros(77, dtype=torch.long)
        caption[:6] = torch.cat([torch.tensor([SOT]), torch.randint(1, MASK, (4,), generator=g), torch.tensor([EOT])])
        return {"images": torch.randn(3, *IMG_SIZE, generator=g), "caption_ids": caption, "pids": i % 4, "index": i}


def ccd_losses() -> Tuple[torch.Tensor, torch.Tensor]:
    """CCD's per-sample losses of a tiny RDE over CCDDataset (batches of 3: the last one is short)."""
    from methods.rde.ccd import per_sample_losses
    model, _ = build("tal", False, train=False)
    return per_sample_losses(model, CCDDataset(), batch_size=3, seed=1, epoch=2)


def step(model, args, forward_model, batches: Sequence[Dict[str, torch.Tensor]]) -> dict:
    """``forward_model`` (``model`` or its DDP wrapper) on each of ``batches``; one step of ``args``'s optimizer on
    the mean of their total losses. Returns the losses of each forward, the gradients, the parameters after the step
    and the buffers (BatchNorm running statistics among them)."""
    optimizer = build_optimizer(args, forward_model)
    rets = [forward_model(b) for b in batches]
    total = sum(sum(v for k, v in ret.items() if "loss" in k) for ret in rets) / len(rets)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return {"losses": [losses_of(r) for r in rets], "grads": grads, "params": params, "buffers": buffers}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank ``rank`` of ``world``: for every config, DDP over the tiny IRRA, rank slice of the global batch, one
    step; writes ``<out_dir>/<config>_rank<rank>.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, loss_names, local, counts in CONFIGS:
            model, args = build(loss_names, local, train=name not in EVAL_MODE_CONFIGS)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            out = step(model, args, ddp, [rank_slice(global_batch(counts), rank, world)])
            torch.save(out, os.path.join(out_dir, f"{name}_rank{rank}.pt"))
        torch.save(ccd_losses(), os.path.join(out_dir, f"ccd_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# GlobalBatchNorm1d alone: 3 steps of 7 rows split unevenly over 2 ranks (the last: all rows on rank 0, none on rank 1)
BN_CHANNELS = 6
BN_SPLITS = ((5, 2), (1, 6), (7, 0))  # rows per rank, each step
BN_MOMENTA = (0.1, None)  # None: cumulative average


def bn_step_data(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input [7, C], upstream gradient [7, C]) of step ``step``: the whole batch, off-centre and scaled."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(sum(BN_SPLITS[0]), BN_CHANNELS, generator=g) * torch.linspace(0.5, 3.0, BN_CHANNELS) + 2.0
    return x, torch.randn(x.shape, generator=g)


def bn_run(bn: torch.nn.BatchNorm1d, rank: int, world: int, steps: int = len(BN_SPLITS)
           ) -> List[Dict[str, torch.Tensor]]:
    """``bn`` in train mode over the first ``steps`` BN_SPLITS steps, then in eval mode on the last step's input; rank ``rank`` of
    ``world`` takes its rows of each step (world 1: all rows). Per step: output, input gradient and weight / bias
    gradients of sum(output * upstream) over this rank's rows; running statistics after it."""
    with torch.no_grad():  # a non-trivial affine part, the same in every process
        bn.weight.copy_(torch.linspace(0.5, 1.5, BN_CHANNELS))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, BN_CHANNELS))
    out = []
    for step, split in enumerate(BN_SPLITS[:steps]):
        x, up = bn_step_data(step)
        start = sum(split[:rank]) if world > 1 else 0
        rows = slice(start, start + split[rank]) if world > 1 else slice(None)
        x = x[rows].clone().requires_grad_(True)  # [n_rank, C]
        bn.train()
        bn.zero_grad(set_to_none=False)
        y = bn(x)
        (y * up[rows]).sum().backward()
        out.append({"y": y.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad.clone(),
                    "bias_grad": bn.bias.grad.clone(), **{k: v.clone() for k, v in bn.named_buffers()}})
    bn.eval()
    with torch.no_grad():
        out.append({"y": bn(bn_step_data(len(BN_SPLITS) - 1)[0])})
    return out


def bn_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank ``rank`` of ``world``: :func:`bn_run` of a GlobalBatchNorm1d for each of BN_MOMENTA, and of a plain
    nn.BatchNorm1d (momentum 0.1, each rank's own rows, first step only: later ones give a rank < 2 rows); writes ``<out_dir>/bn_rank<rank>.pt``."""
    from model.CrossEmbeddingLayer_tse import GlobalBatchNorm1d
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = {str(m): bn_run(GlobalBatchNorm1d(BN_CHANNELS, momentum=m), rank, world) for m in BN_MOMENTA}
        res["plain"] = bn_run(torch.nn.BatchNorm1d(BN_CHANNELS), rank, world, steps=1)
        torch.save(res, os.path.join(out_dir, f"bn_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
