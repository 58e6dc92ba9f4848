"""Small helpers around torch.distributed (work the same without it) and device resolution."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when torch.distributed is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if is_dist() else 0


def get_local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """True on rank 0, the process that logs and writes files."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes (no-op when not distributed)."""
    if get_world_size() > 1:
        dist.barrier()


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto | cpu | <accelerator> | <accelerator>:N`` into a ``torch.device``; ``<accelerator>`` is the device
    type torch reports for this machine's accelerator (``torch.accelerator.current_accelerator().type``).

    ``auto`` picks torch's accelerator when one is available (the local rank's under torchrun), else the CPU.
    Asking for an accelerator that is not available is an error, not a silent fallback.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.accelerator.is_available():
            acc = torch.accelerator.current_accelerator()
            return torch.device(acc.type, get_local_rank() % torch.accelerator.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"--device {spec!r}: expected auto, cpu, or an accelerator (its device type, "
                         "optionally with :N)") from e
    if device.type == "cpu":
        return device
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is None or acc.type != device.type:
        raise ValueError(f"--device {spec}: no {device.type.upper()} device is available on this machine "
                         f"(available: {acc.type if acc is not None else 'cpu only'}); use --device auto or cpu")
    if device.index is None:
        device = torch.device(device.type, get_local_rank() % torch.accelerator.device_count())
    elif device.index >= torch.accelerator.device_count():
        raise ValueError(f"--device {spec}: only {torch.accelerator.device_count()} {device.type} device(s)")
    return device


def all_gather(data: Any) -> List[Any]:
    """Gather any picklable object from every rank; returns the list in rank order."""
    world = get_world_size()
    if world == 1:
        return [data]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, data)
    return out


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
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[b, ...] on every rank -> [world * b, ...], the ranks' slices in rank order.

    This rank's slice is ``tensor`` itself, so it stays in the autograd graph; the other ranks' slices are constants
    (open_clip's ``gather_features``). A loss over the result, computed alike on every rank, gets on each rank the
    gradient through its own samples only: scale it by the world size (:func:`scale_grad`) so that DDP's gradient
    averaging gives the one-process gradient of that loss. Every rank must pass the same shape.
    """
    world = get_world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[get_rank()] = tensor
    return torch.cat(parts)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (a detached copy; ``tensor`` itself is unchanged)."""
    out = tensor.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out)
    return out


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` with the same value but ``factor`` times its gradient in backward."""
    if factor == 1:
        return x
    return x + (factor - 1) * (x - x.detach())


__all__ = ["autocast_context", "is_dist", "get_world_size", "get_rank", "get_local_rank", "is_main_process", "synchronize",
           "resolve_device", "init_distributed", "all_gather", "reduce_dict", "broadcast_object", "unwrap_model",
           "gather_with_grad", "all_reduce_sum", "scale_grad"]


def init_distributed(device_spec: str = "auto") -> torch.device:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1) and return this process's device.

    The backend is torch's default for the device (NCCL on NVIDIA GPUs, gloo on the CPU).
    """
    device = resolve_device(device_spec)
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_dist():
        dist.init_process_group(backend=dist.get_default_backend_for_device(device), init_method="env://")
        synchronize()
    return device


def autocast_context(precision: str, device: torch.device):
    """``torch.autocast`` for the AMP precisions, a no-op context otherwise."""
    if precision == "amp_bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "amp_fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()
