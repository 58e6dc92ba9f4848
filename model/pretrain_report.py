"""What a start from a trained checkpoint (``--pretrain_choice <file>``) loaded, by group of parameters.

Person-pretrained starts (MLLM4Text-ReID, CVPR 2024: an IRRA state dict under ``model`` with ``module.`` keys, which
its ``finetune.py`` loads non-strict) give a model some of its tensors: the report says, per group, how many were
loaded, resized (positional embeddings), skipped for another shape (a classifier for another number of identities),
absent from the checkpoint (kept at their initialisation) and absent from the model. Groups:

- ``backbone``: the CLIP image / text encoders (``base_model.*``), built from the checkpoint itself;
- ``cross-modal``: IRRA's cross-modal reasoning modules (cross attention, cross-modal transformer, MLM head);
- ``classifier``: the identity classifier;
- ``method layers``: everything else (a method's own heads).

The backbone must match: :func:`check_backbone` refuses a checkpoint whose ``base_model.*`` tensors do not fit the
backbone built from them (other than the positional embeddings, which are resized), naming the first such key.
:func:`load_pretrain_report` does the whole non-strict loading for any model: a model whose backbone has other key
names (another layout of the same CLIP encoders) says so through a ``backbone_name`` function.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.checkpoint import load_matching_state_dict

logger = logging.getLogger("IRRA.model.pretrain_report")

GROUPS = ("backbone", "cross-modal", "classifier", "method layers")
KINDS = ("loaded", "resized", "skipped (other shape)", "not in the checkpoint", "not in the model")
BACKBONE_PREFIX = "base_model."
CROSS_MODAL_PREFIXES = ("cross_attn.", "cross_modal_transformer.", "ln_pre_t.", "ln_pre_i.", "ln_post.", "mlm_head.")
CLASSIFIER_PREFIXES = ("classifier.",)
# Backbone tensors whose shape follows the options (image grid, text length): resized, not a mismatch.
RESIZED_BACKBONE_KEYS = ("positional_embedding", "visual.positional_embedding", "visual.attnpool.positional_embedding")
# Entries of a CLIP state dict that are no weight of our backbone (OpenAI's metadata, its learned temperature).
BACKBONE_EXTRAS = ("logit_scale", "input_resolution", "context_length", "vocab_size")


def param_group(name: str) -> str:
    """The group (:data:`GROUPS`) of a model state-dict key."""
    if name.startswith(BACKBONE_PREFIX):
        return "backbone"
    if name.startswith(CROSS_MODAL_PREFIXES):
        return "cross-modal"
    if name.startswith(CLASSIFIER_PREFIXES):
        return "classifier"
    return "method layers"


def check_backbone(checkpoint: Mapping[str, torch.Tensor], model_backbone: Mapping[str, torch.Tensor],
                   source: str) -> Tuple[List[str], List[str]]:
    """The ``base_model.*`` tensors of ``checkpoint`` against the built backbone's state dict ``model_backbone``
    (keys without the prefix). Returns ``(loaded, resized)`` checkpoint names; raises a ValueError naming ``source``
    and the first key that is not in the backbone, lacks in the checkpoint, or has another shape (the positional
    embeddings excepted)."""
    loaded, resized = [], []
    seen = set()
    for name, v in checkpoint.items():
        if not name.startswith(BACKBONE_PREFIX):
            continue
        k = name[len(BACKBONE_PREFIX):]
        seen.add(k)
        if k in BACKBONE_EXTRAS and k not in model_backbone:
            continue
        if k not in model_backbone:
            _refuse(source, name, "is not a tensor of the backbone built from it")
        if tuple(v.shape) == tuple(model_backbone[k].shape):
            loaded.append(name)
        elif k in RESIZED_BACKBONE_KEYS:
            resized.append(f"{name} {tuple(v.shape)} -> {tuple(model_backbone[k].shape)}")
        else:
            _refuse(source, name, f"has shape {tuple(v.shape)}, the backbone {tuple(model_backbone[k].shape)}")
    missing = [k for k in model_backbone if k not in seen and not k.endswith("num_batches_tracked")]
    if missing:
        _refuse(source, BACKBONE_PREFIX + missing[0], f"is missing ({len(missing)} backbone tensors are)")
    return loaded, resized


def _refuse(source: str, key: str, why: str) -> None:
    raise ValueError(f"--pretrain_choice {source}: the checkpoint's backbone does not match: first mismatched key "
                     f"{key!r} {why}; expected an IRRA-layout checkpoint whose base_model.* is one CLIP backbone")


def group_report(loaded: Iterable[str], resized: Iterable[str], mismatched: Iterable[str],
                 fresh: Iterable[str], unexpected: Iterable[str]) -> Dict[str, Dict[str, List[str]]]:
    """``{group: {kind: names}}`` (every group and kind present) from the loading's lists (names may carry a
    ``": why"`` or ``" shape -> shape"`` suffix; the group is read from the name)."""
    report = {g: {k: [] for k in KINDS} for g in GROUPS}
    for kind, names in zip(KINDS, (loaded, resized, mismatched, fresh, unexpected)):
        for n in names:
            report[param_group(n.split(" ", 1)[0].rstrip(":"))][kind].append(n)
    return report


def format_group_report(report: Dict[str, Dict[str, List[str]]], limit: int = 3) -> List[str]:
    """One line per group that has something: ``backbone: 150 loaded, 2 resized (...)``."""
    lines = []
    for g in GROUPS:
        parts = []
        for kind in KINDS:
            names: Sequence[str] = report[g][kind]
            if names:
                detail = "" if kind == "loaded" else \
                    " (" + ", ".join(names[:limit]) + (f", +{len(names) - limit} more" if len(names) > limit else "") + ")"
                parts.append(f"{len(names)} {kind}{detail}")
        if parts:
            lines.append(f"{g}: " + "; ".join(parts))
    return lines


def irra_backbone_name(model_key: str) -> Optional[str]:
    """IRRA's layout: the CLIP key (``base_model.`` removed) of a model's backbone tensor; None for the others."""
    return model_key[len(BACKBONE_PREFIX):] if model_key.startswith(BACKBONE_PREFIX) else None


def load_pretrain_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                         backbone_name: Callable[[str], Optional[str]] = irra_backbone_name
                         ) -> Dict[str, Dict[str, List[str]]]:
    """The non-strict start of ``model`` from the IRRA-layout ``state_dict`` (``module.`` stripped) of file
    ``source``, and its report by group, logged and returned (``{group: {kind: names}}``).

    The backbone is the caller's to load (built from the checkpoint's ``base_model.*``, positional embeddings
    resized): here it is checked (:func:`check_backbone`: a mismatch raises naming the first mismatched key) and
    reported under the checkpoint's names. ``backbone_name(model key)`` is the CLIP key of a model's backbone tensor
    (None for the model's other tensors; default: IRRA's ``base_model.<clip key>``). Every other tensor of the
    checkpoint whose name and shape match one of the model's other tensors is loaded; the rest is reported (other
    shape, not in the model); the model's other tensors that the checkpoint lacks keep their initialisation."""
    own = model.state_dict()
    names = {k: backbone_name(k) for k in own}
    model_backbone = {clip: own[k] for k, clip in names.items() if clip is not None}
    loaded, resized = check_backbone(state_dict, model_backbone, source)
    rest = {k: v for k, v in state_dict.items() if not k.startswith(BACKBONE_PREFIX)}
    clash = [k for k in rest if k in names and names[k] is not None]  # a model backbone name outside base_model.*
    report = load_matching_state_dict(model, {k: v for k, v in rest.items() if k not in clash})
    fresh = [k for k in report["fresh"] if names[k] is None]
    groups = group_report(loaded + report["loaded"], resized, report["mismatched"], fresh,
                          report["unexpected"] + clash)
    logger.info("fine-tuning from the IRRA checkpoint %s: %d tensors loaded, %d resized, %d skipped, %d of this model "
                "not in the checkpoint (kept at their initialisation), %d not in this model", source,
                len(loaded) + len(report["loaded"]), len(resized), len(report["mismatched"]), len(fresh),
                len(report["unexpected"]) + len(clash))
    for line in format_group_report(groups):
        logger.info("  %s", line)
    return groups
