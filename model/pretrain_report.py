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
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch

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
