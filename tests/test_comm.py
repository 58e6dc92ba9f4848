"""Device resolution and the single-process behaviour of the distributed helpers."""
import pytest
import torch

from utils.comm import all_gather, get_rank, get_world_size, reduce_dict, resolve_device


def fake_accelerator(monkeypatch, device_type=None, count=0, local_rank=0):
    """Stand in for ``torch.accelerator``: a machine with ``count`` devices of ``device_type`` (None: CPU only),
    and torchrun's LOCAL_RANK."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: device_type is not None)
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda *a, **k: torch.device(device_type) if device_type is not None else None)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


def test_cpu_only_machine(monkeypatch):
    fake_accelerator(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device xpu:1: no XPU device is available on this machine "
                                         r"\(available: cpu only\); use --device auto or cpu"):
        resolve_device("xpu:1")
    with pytest.raises(ValueError, match="--device 'gpu0': expected auto, cpu, or an accelerator"):
        resolve_device("gpu0")


def test_machine_with_two_accelerators(monkeypatch):
    """auto and a bare device type take the local rank's device (modulo the count); an index is kept and checked;
    another device type is refused, naming the one available."""
    fake_accelerator(monkeypatch, "xpu", count=2, local_rank=3)
    assert resolve_device("auto") == torch.device("xpu", 1)
    assert resolve_device("xpu") == torch.device("xpu", 1)
    assert resolve_device("xpu:0") == torch.device("xpu", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device xpu:2: only 2 xpu device\(s\)"):
        resolve_device("xpu:2")
    with pytest.raises(ValueError, match=r"--device mps: no MPS device is available on this machine \(available: xpu\)"):
        resolve_device("mps")
    fake_accelerator(monkeypatch, "xpu", count=2, local_rank=0)
    assert resolve_device("auto") == torch.device("xpu", 0)


def test_single_process_helpers_are_identities():
    assert get_rank() == 0 and get_world_size() == 1
    assert all_gather({"a": 1}) == [{"a": 1}]
    d = {"loss": torch.tensor(2.0)}
    assert reduce_dict(d) is d
