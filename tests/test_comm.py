"""Device resolution and the single-process behaviour of the distributed helpers."""
import pytest
import torch

from utils.comm import all_gather, get_rank, get_world_size, reduce_dict, resolve_device


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cpu" if not torch.accelerator.is_available() else torch.accelerator.current_accelerator().type)
    with pytest.raises(ValueError, match="--device 'gpu0': expected auto, cpu"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:1: no CUDA device is available"):
            resolve_device("cuda:1")


def test_single_process_helpers_are_identities():
    assert get_rank() == 0 and get_world_size() == 1
    assert all_gather({"a": 1}) == [{"a": 1}]
    d = {"loss": torch.tensor(2.0)}
    assert reduce_dict(d) is d
