"""Save / load / resume training checkpoints ({"model": state_dict, "optimizer": ..., "scheduler": ..., **extra}).

Compatible with the original IRRA checkpoints (same layout and parameter names). Saves are atomic
(temporary file in the same directory + os.replace); loads use ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Dict, Iterable, Optional, Union

import torch
from torch import nn

from utils.comm import unwrap_model

CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")


def strip_prefix_if_present(state_dict: Dict[str, Any], prefix: str = "module.") -> Dict[str, Any]:
    """Remove ``prefix`` from every key if ALL keys start with it (DDP checkpoints)."""
    keys = list(state_dict.keys())
    if not keys or not all(k.startswith(prefix) for k in keys):
        return state_dict
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def load_state_dict(model: nn.Module, loaded_state_dict: Dict[str, torch.Tensor], strict: bool = True,
                    except_keys: Optional[Iterable[str]] = None, source: str = "checkpoint") -> None:
    """Load ``loaded_state_dict`` into ``model`` (strips "module.", checks shapes, names the ``source``).

    - classifier size mismatch -> ValueError naming both numbers of classes;
    - any other shape mismatch -> ValueError;
    - missing / unexpected keys -> ValueError when ``strict``, else a warning;
    - ``except_keys``: keys skipped on purpose.
    """
    log = logging.getLogger("IRRA.checkpoint")
    sd = strip_prefix_if_present(dict(loaded_state_dict), "module.")
    model = unwrap_model(model)
    except_keys = set(except_keys or ())
    sd = {k: v for k, v in sd.items() if k not in except_keys}
    own = model.state_dict()

    if "classifier.weight" in sd and "classifier.weight" in own:
        n_ckpt, n_model = sd["classifier.weight"].shape[0], own["classifier.weight"].shape[0]
        if n_ckpt != n_model:
            raise ValueError(f"{source}: the checkpoint's classifier has {n_ckpt} classes but the model has "
                             f"{n_model} (num_classes of the training set); train/test on the same dataset or load "
                             f"with except_keys={list(CLASSIFIER_KEYS)}")
    bad_shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad_shapes:
        raise ValueError(f"{source}: {len(bad_shapes)} shape mismatches, e.g. {bad_shapes[:5]}")
    missing = [k for k in own if k not in sd and k not in except_keys]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        msg = (f"{source}: {len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys "
               f"{unexpected[:8]} (a different model configuration, e.g. other loss_names / pretrain_choice?)")
        if strict:
            raise ValueError(msg + "; pass strict=False to load the matching part")
        log.warning(msg)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


class Checkpointer:
    """Detectron-style checkpointer (model + optional optimizer/scheduler)."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None,
                 save_dir: str = "", save_to_disk: Optional[bool] = None,
                 logger: Optional[logging.Logger] = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.save_dir = save_dir
        self.save_to_disk = True if save_to_disk is None else save_to_disk
        self.logger = logger or logging.getLogger("IRRA.checkpoint")

    def _model(self) -> nn.Module:
        return unwrap_model(self.model)

    def save(self, name: str, **kwargs: Any) -> Optional[str]:
        """Write ``<save_dir>/<name>.pth`` atomically; returns its path (None when saving is disabled)."""
        if not self.save_dir or not self.save_to_disk:
            return None
        data: Dict[str, Any] = {"model": self._model().state_dict()}
        if self.optimizer is not None:
            data["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            data["scheduler"] = self.scheduler.state_dict()
        data.update(kwargs)
        os.makedirs(self.save_dir, exist_ok=True)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.save_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
            os.replace(tmp, save_file)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        self.logger.info("Saving checkpoint to %s", save_file)
        return save_file

    def _read(self, f: Optional[str]) -> Dict[str, Any]:
        if not f:
            raise ValueError("no checkpoint file given (set --resume_ckpt_file / pass the path)")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"checkpoint file not found: {f}")
        self.logger.info("Loading checkpoint from %s", f)
        ckpt = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{f}: expected a checkpoint dict, got {type(ckpt).__name__}")
        if "model" not in ckpt:  # a bare state dict
            ckpt = {"model": ckpt}
        return ckpt

    def load(self, f: Optional[str] = None, strict: bool = True,
             except_keys: Optional[Iterable[str]] = None) -> Dict[str, Any]:
        """Load the model weights from ``f``; returns the rest of the checkpoint (optimizer/scheduler included)."""
        checkpoint = self._read(f)
        load_state_dict(self._model(), checkpoint.pop("model"), strict=strict, except_keys=except_keys, source=f)
        return checkpoint

    def resume(self, f: Optional[str] = None, strict: bool = True) -> Dict[str, Any]:
        """Load model + optimizer + scheduler from ``f``; returns the extra entries (epoch, ...)."""
        checkpoint = self.load(f, strict=strict)
        if self.optimizer is not None:
            if "optimizer" not in checkpoint:
                raise ValueError(f"{f}: no optimizer state to resume from")
            self.logger.info("Loading optimizer from %s", f)
            self.optimizer.load_state_dict(checkpoint.pop("optimizer"))
        if self.scheduler is not None:
            if "scheduler" not in checkpoint:
                raise ValueError(f"{f}: no scheduler state to resume from")
            self.logger.info("Loading scheduler from %s", f)
            self.scheduler.load_state_dict(checkpoint.pop("scheduler"))
        checkpoint.pop("optimizer", None)
        checkpoint.pop("scheduler", None)
        return checkpoint


def read_model_state_dict(f: str) -> Dict[str, torch.Tensor]:
    """The model weights of checkpoint ``f`` (ours or the original's; a ``module.`` prefix stripped)."""
    if not os.path.isfile(f):
        raise FileNotFoundError(f"checkpoint file not found: {f}")
    ckpt = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{f}: expected a checkpoint dict with a 'model' state dict")
    return strip_prefix_if_present(sd, "module.")


def checkpoint_num_classes(f: Union[str, Dict[str, torch.Tensor]], default: Optional[int] = None) -> Optional[int]:
    """Number of identities of the ID classifier in checkpoint ``f`` (a path, or its ``read_model_state_dict``);
    ``default`` when it has none."""
    w = (read_model_state_dict(f) if isinstance(f, str) else f).get("classifier.weight")
    return int(w.shape[0]) if w is not None else default


def clip_state_dict_from_checkpoint(f: Union[str, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The CLIP weights (``base_model.*``, prefix removed) of an IRRA checkpoint (a path, or its
    ``read_model_state_dict``): enough to rebuild its backbone without the pretrained CLIP file
    (``build_model(..., clip_state_dict=...)``)."""
    prefix = "base_model."
    full = read_model_state_dict(f) if isinstance(f, str) else f
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{f if isinstance(f, str) else 'checkpoint'}: no base_model.* weights: not an IRRA checkpoint")
    return sd
