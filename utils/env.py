"""What a run's numbers depend on besides its options and seed: the software and hardware it ran on.

``environment_info(device)`` is saved in ``configs.yaml`` (key ``environment``, ignored when the file is reused as
``--config``) and logged in the first lines of ``train_log.txt``. A run repeats its numbers to the last digit on the
same kind of machine; float summation order differs between torch's CPU kernel families (``cpu_capability``: AVX512,
AVX2, DEFAULT...), CPU models and thread counts, and between GPU models, so on another kind the digits differ, within
the spread of seeds.
"""
from __future__ import annotations

import platform
from typing import Any, Dict, Optional

import torch


def cpu_model() -> Optional[str]:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``), None when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def environment_info(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """``{"torch", "cpu_capability", "cpu", "threads", "gpu", "python"}``: torch's version, the CPU kernel family
    torch dispatches to (``torch.backends.cpu.get_cpu_capability()``), the CPU model, torch's intra-op threads (a
    parallel reduction sums in one order per thread count), the accelerator's name when ``device`` is one (else
    None)."""
    gpu = None
    if device is not None and device.type != "cpu":
        try:
            gpu = str(torch.get_device_module(device).get_device_name(device))
        except (AttributeError, RuntimeError, AssertionError):  # a backend without device names
            gpu = device.type
    return {"torch": str(torch.__version__), "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "cpu": cpu_model(), "threads": torch.get_num_threads(), "gpu": gpu, "python": platform.python_version()}


def describe_environment(info: Dict[str, Any]) -> str:
    """One log line: ``torch 2.x, CPU capability AVX512, GPU none, CPU AMD EPYC, 2 threads, python 3.11``."""
    return (f"torch {info['torch']}, CPU capability {info['cpu_capability']}, GPU {info['gpu'] or 'none'}, "
            f"CPU {info['cpu'] or 'unknown'}, {info['threads']} threads, python {info['python']}")
