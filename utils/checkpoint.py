"""Generic checkpoint files: reading them safely, loading a state dict into a module, and ``Checkpointer``.

Training checkpoints are ``{"model": state_dict, "optimizer": ..., "scheduler": ..., **extra}``, the original IRRA's
layout. Saves are atomic (``utils.run_dir.atomic_write``: temporary file in the same directory + os.replace); loads use
``torch.load(weights_only=True)`` (:func:`torch_load`) and name the file when it cannot be read. What the weights
*mean* (an IRRA checkpoint's ``base_model.*`` backbone, its number of identities, CLIP files) is in
:mod:`model.pretrained`.

Loading policies (each with one use, so each is its own function rather than a flag):

- strict (:func:`load_state_dict`, ``strict=True``): every tensor of the model must come from the checkpoint with
  its shape, save the ``except_keys``. For a model's own checkpoint: resume, test, retrieval (``Checkpointer``,
  ``model.build.build_model_from_checkpoint``); anything else means another configuration and is an error.
- matching (:func:`load_matching_state_dict`): copy what matches by name and shape, report the rest. For
  fine-tuning from another run's IRRA checkpoint (``--pretrain_choice best.pth``, ``model.build``), where another
  number of identities or other losses are expected, not errors.
- resize, then strict (:meth:`model.clip_model.CLIP.load_param`): pretrained CLIP weights into a CLIP built for
  another image / text size; its positional embeddings are resized, every other weight must fit.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import zipfile
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from utils.comm import unwrap_model
from utils.run_dir import atomic_write, checkpoint_file

CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")


class CheckpointReadError(ValueError):
    """A file that is not a readable torch checkpoint (empty, truncated, random bytes, unsafe objects)."""


class OptimizerStateError(ValueError):
    """A checkpoint's optimizer state that does not fit the optimizer it is resumed into (other parameters or
    param groups); the caller that built the optimizer adds which options decide its layout."""


def torch_load(f: str, mmap: bool = True) -> Any:
    """``torch.load(f, map_location="cpu", weights_only=True)``, memory-mapped when ``mmap`` and the file is in torch's
    zip format (legacy non-zip files load without mmap). A missing file raises FileNotFoundError; a file torch cannot
    read raises :class:`CheckpointReadError` naming it."""
    if not os.path.isfile(f):
        raise FileNotFoundError(f"checkpoint file not found: {f}")
    if os.path.getsize(f) == 0:
        raise CheckpointReadError(f"{f}: empty file (0 bytes), not a readable torch checkpoint")
    use_mmap = mmap and zipfile.is_zipfile(f)
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as e:  # random bytes reach the unpickler's internals: IndexError, KeyError, MemoryError, ...
        text = str(e)
        if "Weights only load failed" in text and "Unsupported global" in text:
            what = re.search(r"GLOBAL (\S+)", text)
            why = (f"it holds Python objects other than tensors and plain containers"
                   f"{f' ({what.group(1)})' if what else ''}, which the safe loader refuses; save its weights with "
                   f"torch.save({{'model': model.state_dict()}})")
        else:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # random bytes: "Unsupported operand 219"
            first = detail.group(1).strip() if detail else next(
                (ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln), "")
            first = first.split(". This is an internal miniz error")[0]  # torch's zip reader adds a long hint
            why = f"truncated, corrupt or not written by torch.save ({type(e).__name__}: {first[:200]})"
        raise CheckpointReadError(f"{f}: not a readable torch checkpoint: {why}") from None


def strip_prefix_if_present(state_dict: Dict[str, Any], prefix: str = "module.") -> Dict[str, Any]:
    """Remove ``prefix`` from every key if ALL keys start with it (DDP checkpoints)."""
    keys = list(state_dict.keys())
    if not keys or not all(k.startswith(prefix) for k in keys):
        return state_dict
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def check_key(key: str, except_keys: Optional[Iterable[str]]) -> bool:
    """True when ``key`` contains one of ``except_keys`` (the original's substring rule)."""
    return any(k in key for k in (except_keys or ()))


def load_state_dict(model: nn.Module, loaded_state_dict: Dict[str, torch.Tensor],
                    except_keys: Optional[Iterable[str]] = None, strict: bool = True,
                    source: str = "checkpoint") -> None:
    """Load ``loaded_state_dict`` into ``model`` (strips "module.", checks shapes, names the ``source``): the strict
    policy (see the module docstring).

    - ``except_keys``: keys containing any of these strings are skipped on purpose (the original's rule, e.g.
      ``["classifier"]``), also on the model's side (they are not reported missing);
    - classifier size mismatch -> ValueError naming both numbers of classes;
    - any other shape mismatch -> ValueError;
    - missing / unexpected keys -> ValueError when ``strict``, else a warning.
    """
    log = logging.getLogger("IRRA.checkpoint")
    sd = strip_prefix_if_present(dict(loaded_state_dict), "module.")
    model = unwrap_model(model)
    except_keys = list(except_keys or ())
    sd = {k: v for k, v in sd.items() if not check_key(k, except_keys)}
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
    missing = [k for k in own if k not in sd and not check_key(k, except_keys)]
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
        """Write ``<save_dir>/<name>.pth`` atomically; returns its path (None when saving is disabled).

        The previous file stays in place until the new one is complete (a full disk raises an OSError saying so);
        temporary files of an earlier save that was killed are removed; the file gets the mode of the other files
        of the run (0666 less the umask)."""
        if not self.save_dir or not self.save_to_disk:
            return None
        data: Dict[str, Any] = {"model": self._model().state_dict()}
        if self.optimizer is not None:
            data["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            data["scheduler"] = self.scheduler.state_dict()
        data.update(kwargs)
        os.makedirs(self.save_dir, exist_ok=True)
        save_file = checkpoint_file(self.save_dir, name)
        try:  # temporary files of saves that were killed are removed first (never a live writer's)
            atomic_write(save_file, lambda f: torch.save(data, f), remove_stale=True)
        except BaseException as e:
            if _disk_full(e):
                raise OSError(errno.ENOSPC, f"No space left on device while writing {save_file}; the previous "
                                            f"{name}.pth (if any) is kept") from None
            raise
        self.logger.info("Saving checkpoint to %s", save_file)
        return save_file

    def _read(self, f: Optional[str]) -> Dict[str, Any]:
        if not f:
            raise ValueError("no checkpoint file given (set --resume_ckpt_file / pass the path)")
        self.logger.info("Loading checkpoint from %s", f)
        return read_checkpoint(f, mmap=False)

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
            state = checkpoint.pop("optimizer")
            try:
                self.optimizer.load_state_dict(state)
            except (ValueError, KeyError) as e:
                saved = len(state.get("param_groups", [])) if isinstance(state, dict) else "?"
                raise OptimizerStateError(
                    f"{f}: its optimizer state does not fit this optimizer ({saved} saved param groups, "
                    f"{len(self.optimizer.param_groups)} here: {e})") from e
        if self.scheduler is not None:
            if "scheduler" not in checkpoint:
                raise ValueError(f"{f}: no scheduler state to resume from")
            self.logger.info("Loading scheduler from %s", f)
            self.scheduler.load_state_dict(checkpoint.pop("scheduler"))
        checkpoint.pop("optimizer", None)
        checkpoint.pop("scheduler", None)
        return checkpoint


def _disk_full(e: BaseException) -> bool:
    """True when ``e`` (or an exception it was raised from) is ENOSPC; torch's writer reports a failed write as
    ``unexpected pos`` with the OSError as context."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


def read_checkpoint(f: str, mmap: bool = True) -> Dict[str, Any]:
    """Checkpoint ``f`` as ``{"model": state_dict, ...}`` (ours, the original's, or a bare state dict, which becomes
    the "model" entry). Errors name the file (see :func:`torch_load`)."""
    ckpt = torch_load(f, mmap=mmap)
    if not isinstance(ckpt, dict):
        raise CheckpointReadError(f"{f}: expected a checkpoint dict, got {type(ckpt).__name__}")
    if "model" not in ckpt:  # a bare state dict
        ckpt = {"model": ckpt}
    if not isinstance(ckpt["model"], dict):
        raise CheckpointReadError(f"{f}: expected a checkpoint dict with a 'model' state dict")
    return ckpt


def model_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of a :func:`read_checkpoint` dict, a ``module.`` prefix stripped."""
    return strip_prefix_if_present(checkpoint["model"], "module.")


def read_model_state_dict(f: str) -> Dict[str, torch.Tensor]:
    """The model weights of checkpoint ``f`` (ours or the original's; a ``module.`` prefix stripped)."""
    return model_state_dict(read_checkpoint(f))


def load_matching_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                             ignore_prefixes: Iterable[str] = ()) -> Dict[str, List[str]]:
    """Copy into ``model`` every tensor of ``state_dict`` whose name and shape match one of the model's (cast to the
    model's dtype); the model's other tensors keep their values: the matching policy (see the module docstring). Keys starting with one of ``ignore_prefixes`` are
    left out on both sides (loaded by the caller).

    Returns ``{"loaded": names, "mismatched": ["name: why", ...] (other shape), "unexpected": names not in the
    model, "fresh": the model's names absent from state_dict}``.
    """
    ignore = tuple(ignore_prefixes)
    own = unwrap_model(model).state_dict()
    report: Dict[str, List[str]] = {"loaded": [], "mismatched": [], "unexpected": [], "fresh": []}
    with torch.no_grad():
        for k, v in state_dict.items():
            if k.startswith(ignore):  # str.startswith(()) is False
                continue
            if k not in own:
                report["unexpected"].append(k)
            elif tuple(v.shape) != tuple(own[k].shape):
                why = "another number of identities, " if k in CLASSIFIER_KEYS else ""
                report["mismatched"].append(f"{k}: {why}checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
            else:
                own[k].copy_(v)
                report["loaded"].append(k)
    report["fresh"] = [k for k in own if k not in state_dict and not k.startswith(ignore)]
    return report


def summarize_names(names: Sequence[str], limit: int = 8) -> str:
    """Compact list for a log line: up to ``limit`` names, then ``... (+N more)``."""
    names = list(names)
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def count_by_module(names: Iterable[str]) -> str:
    """``"base_model: 150, cross_attn: 4, ..."``: the number of names per first dotted component, in first-seen order."""
    counts: Dict[str, int] = {}
    for n in names:
        top = n.split(".", 1)[0]
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{m}: {c}" for m, c in counts.items())
