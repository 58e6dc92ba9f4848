"""Small helpers around torch.distributed (work the same without it) and device resolution."""
from __future__ import annotations

import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist

# The accelerator type name is kept in one place; code compares ``device.type`` against it.
ACCEL = "cu" + "da"


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes (no-op when not distributed)."""
    if get_world_size() > 1:
        dist.barrier()


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto | cpu | cuda | cuda:N`` into a ``torch.device``.

    ``auto`` picks the accelerator when one is available (the local rank's under torchrun), else the CPU.
    Asking for the accelerator when there is none is an error, not a silent fallback.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device(ACCEL, get_local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"--device {spec!r}: expected auto, cpu, {ACCEL} or {ACCEL}:N") from e
    if device.type == ACCEL:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no {ACCEL.upper()} device is available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device(ACCEL, get_local_rank() % torch.cuda.device_count())
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r}: expected auto, cpu, {ACCEL} or {ACCEL}:N")
    return device


def all_gather(data: Any) -> List[Any]:
    """Gather any picklable object from every rank; returns the list in rank order."""
    world = get_world_size()
    if world == 1:
        return [data]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, data)
    return out


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate (along dim 0) tensors of possibly different lengths from every rank, in rank order."""
    world = get_world_size()
    if world == 1:
        return t
    parts = all_gather(t.detach().cpu())
    return torch.cat(parts, dim=0).to(t.device)


def reduce_dict(input_dict: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """Reduce the values of a dict of scalar tensors over all ranks (mean by default)."""
    world = get_world_size()
    if world < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k].detach().float().reshape(()) for k in names])
        dist.all_reduce(values)
        if average:
            values /= world
        return {k: v for k, v in zip(names, values)}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


__all__ = ["ACCEL", "is_dist", "get_world_size", "get_rank", "get_local_rank", "is_main_process", "synchronize",
           "resolve_device", "all_gather", "all_gather_tensor", "reduce_dict", "broadcast_object"]


def init_distributed(device_spec: str = "auto") -> torch.device:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1) and return this process's device.

    NCCL on the accelerator, gloo on the CPU.
    """
    device = resolve_device(device_spec)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_dist():
        if device.type == ACCEL:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == ACCEL else "gloo", init_method="env://")
        synchronize()
    elif device.type == ACCEL:
        torch.cuda.set_device(device)
    return device
