"""Reading TBPS-CLIP's own training checkpoints safely.

TBPS's ``main.py`` saves ``{"model": state_dict, "optimizer": ..., "config": EasyDict}``: the ``EasyDict`` (a dict
subclass filled item by item) makes ``torch.load(weights_only=True)`` refuse the file. :func:`load_tbps_file` reads
it with ``weights_only=True`` first and, only when that fails on such a config, with a whitelisting unpickler: torch's
tensor / storage rebuild functions, ``collections.OrderedDict`` and ``easydict.EasyDict`` (read as a plain
:class:`ConfigDict`; no code of the easydict package runs, it need not be installed). Any other global raises, as
the weights-only loader would.
"""
from __future__ import annotations

import pickle
import types
from typing import Any

import torch

from utils.checkpoint import CheckpointReadError, torch_load


class ConfigDict(dict):
    """Stand-in for TBPS's ``easydict.EasyDict`` config: a plain dict (attributes kept in ``__dict__``)."""


ALLOWED = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("easydict", "EasyDict"): ConfigDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):  # legacy typed storages (zip files map them before)
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a TBPS checkpoint")


_PICKLE = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="tbps_safe_pickle")


def load_tbps_file(path: str) -> Any:
    """The object in ``path``: ``torch.load(weights_only=True)``, or for TBPS's files with an EasyDict config the
    whitelisting unpickler (module docstring). Errors name the file."""
    try:
        return torch_load(path)
    except CheckpointReadError as e:
        if "easydict" not in str(e).lower():
            raise
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE)
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(f"{path}: not a readable TBPS-CLIP checkpoint: {e}") from None
