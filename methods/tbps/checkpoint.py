"""TBPS-CLIP's weights: its saved checkpoints (``{"model": state_dict}``, keys ``visual.*`` / ``encode_text.*`` /
``simclr_mlp.*`` / ``classifier.*`` / ``logit_scale``, what its ``ckpt_type: saved`` loads) and OpenAI CLIP weights
mapped to TBPS's keys as its ``misc/build.py:load_checkpoint`` (``ckpt_type: original_clip``) does.

The architecture is inferred from the weights; attention heads are width // ``head_width`` (CLIP's rule, 64).
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from methods.tbps.functions import interpolate_text, resize_pos_embed
from methods.tbps.model import TBPS, TBPSArch, TBPSLossConfig, vision_grid
from model.pretrain_report import load_pretrain_report
from model.pretrained import (_pair, clip_config_from_state_dict, image_positions, infer_image_grid, is_pretrained_file,
                              load_pretrained, load_pretrained_file)
from methods.tbps.safe_load import load_tbps_file
from utils.checkpoint import CheckpointReadError, strip_prefix_if_present

logger = logging.getLogger("IRRA.model.tbps")

HEAD_WIDTH = 64  # CLIP's (and TBPS's hard-coded) heads = width // 64
TEXT_KEYS = ("positional_embedding", "token_embedding.weight", "ln_final.weight", "ln_final.bias", "text_projection")
DROPPED_CLIP_KEYS = ("input_resolution", "context_length", "vocab_size")
TEXT_PREFIX = "encode_text."  # TBPS's text tower: CLIP's text keys under this prefix


def is_tbps_state_dict(state_dict: Dict[str, Any]) -> bool:
    """True for TBPS's layout: a ``visual.proj`` and an ``encode_text.text_projection`` (``module.`` stripped)."""
    sd = strip_prefix_if_present(state_dict, "module.")
    return "visual.proj" in sd and "encode_text.text_projection" in sd


def read_tbps_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a TBPS checkpoint file (``{"model": sd}``, TBPS's training checkpoint ``{"model", "optimizer",
    "config"}`` or a bare sd; ``module.`` stripped), read with ``weights_only=True`` (TBPS's EasyDict config through
    the whitelisting unpickler of ``methods/tbps/safe_load.py``). Not TBPS's layout -> CheckpointReadError."""
    obj = load_tbps_file(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointReadError(f"{path}: expected TBPS-CLIP's {{'model': state_dict}}, got {type(obj).__name__}")
    sd = strip_prefix_if_present({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, "module.")
    if not is_tbps_state_dict(sd):
        raise CheckpointReadError(f"{path}: not a TBPS-CLIP checkpoint (expected keys visual.proj and "
                                  f"encode_text.text_projection; found e.g. {sorted(sd)[:5]})")
    return sd


def _count_blocks(sd: Dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd for m in [pat.match(k)] if m})


def arch_from_state_dict(sd: Dict[str, torch.Tensor], image_size: Sequence[int], head_width: int = HEAD_WIDTH,
                         context_length: Optional[int] = None) -> TBPSArch:
    """The architecture of TBPS weights ``sd`` built for ``image_size`` (H, W); ``context_length`` None keeps the
    weights'. simclr_mlp / num_classes come from the heads present (None when absent)."""
    try:
        conv = sd["visual.conv1.weight"]  # [width, 3, patch, patch]
        vision_width, patch = conv.shape[0], conv.shape[-1]
        embed_dim = sd["visual.proj"].shape[1]
        text_width = sd["encode_text.ln_final.weight"].shape[0]
        ctx = sd["encode_text.positional_embedding"].shape[0]
        vocab = sd["encode_text.token_embedding.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not TBPS-CLIP weights: missing {e}") from None
    mlp = None
    if "simclr_mlp.0.weight" in sd and "simclr_mlp.2.weight" in sd:
        hidden, d_in = sd["simclr_mlp.0.weight"].shape
        mlp = (int(d_in), int(hidden), int(sd["simclr_mlp.2.weight"].shape[0]))
    num_classes = int(sd["classifier.weight"].shape[0]) if "classifier.weight" in sd else None
    return TBPSArch(embed_dim=int(embed_dim), image_size=_pair(tuple(image_size)), patch_size=int(patch),
                    vision_width=int(vision_width), vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
                    vision_heads=max(int(vision_width) // head_width, 1),
                    context_length=int(context_length or ctx), vocab_size=int(vocab), text_width=int(text_width),
                    text_layers=_count_blocks(sd, "encode_text.transformer.resblocks."),
                    text_heads=max(int(text_width) // head_width, 1), simclr_mlp=mlp, num_classes=num_classes)


def clip_to_tbps_state_dict(clip_sd: Dict[str, torch.Tensor], text_length: int = 77) -> Dict[str, torch.Tensor]:
    """OpenAI CLIP keys -> TBPS's (``load_checkpoint``, original_clip): the text tower under ``encode_text.``, its
    positional embedding through :func:`interpolate_text` to ``text_length``; everything else as it is, CLIP's
    ``logit_scale`` included (so a fine-tuning from CLIP starts from CLIP's learned scale, exp = 100, not 1/0.07)."""
    out: Dict[str, torch.Tensor] = {}
    for name, params in clip_sd.items():
        if name in DROPPED_CLIP_KEYS:
            continue
        if name == "positional_embedding":
            out[TEXT_PREFIX + name] = interpolate_text(params, text_length)
        elif name.startswith("transformer") or name in TEXT_KEYS:
            out[TEXT_PREFIX + name] = params
        else:
            out[name] = params
    return out


def tbps_backbone_name(model_key: str) -> Optional[str]:
    """The CLIP key of a TBPS backbone tensor (``visual.*`` as it is, ``encode_text.*`` without the prefix: the inverse
    of :func:`clip_to_tbps_state_dict`); None for TBPS's heads and ``logit_scale``."""
    if model_key.startswith("visual."):
        return model_key
    if model_key.startswith(TEXT_PREFIX):
        return model_key[len(TEXT_PREFIX):]
    return None


def copy_tbps_weights(model: TBPS, sd: Dict[str, torch.Tensor], source: str = "checkpoint",
                      old_grid: Optional[Tuple[int, int]] = None) -> Tuple[List[str], List[str]]:
    """Copy the TBPS weights ``sd`` into ``model``, the image positional embedding resized to the model's grid
    (bilinear, from ``old_grid`` or the grid inferred from its length), the text one cut/interpolated to the context
    length; an irreconcilable shape raises naming ``source``. Returns (the model's names loaded, names it lacks)."""
    own = model.state_dict()
    grid = vision_grid(model.arch)
    loaded, extra = [], []
    with torch.no_grad():
        for k, v in sd.items():
            if k not in own:
                extra.append(k)
                continue
            target = own[k]
            if k == "visual.positional_embedding" and v.shape != target.shape:
                og = old_grid or infer_image_grid(v.shape[0] - 1, grid, source)
                v = resize_pos_embed(v.float(), None, *grid, old_grid=og).to(v.dtype)  # [1+P_old, D] -> [1+P, D]
            elif k == "encode_text.positional_embedding" and v.shape != target.shape:
                v = interpolate_text(v, target.shape[0])  # [L_old, D] -> [L, D]
            if v.shape != target.shape:
                raise ValueError(f"{source}: weight {k!r} has shape {tuple(v.shape)}, the model's is "
                                 f"{tuple(target.shape)} (another architecture?)")
            target.copy_(v)
            loaded.append(k)
    return loaded, extra


def load_tbps_weights(model: TBPS, sd: Dict[str, torch.Tensor], source: str = "checkpoint",
                      old_grid: Optional[Tuple[int, int]] = None) -> None:
    """Copy TBPS weights into ``model`` (:func:`copy_tbps_weights`). Keys the model lacks are ignored (logged); a
    missing backbone weight raises naming ``source``; heads the weights lack (simclr_mlp, classifier) keep their
    initialisation (logged)."""
    loaded, extra = copy_tbps_weights(model, sd, source, old_grid)
    done = set(loaded)
    missing = [k for k in model.state_dict() if k not in done]
    backbone = [k for k in missing if k.startswith(("visual.", TEXT_PREFIX)) or k == "logit_scale"]
    if backbone:
        raise ValueError(f"{source}: lacks {len(backbone)} weights of the TBPS model, e.g. {backbone[:5]}")
    if missing:
        logger.info("%s: %d head weights not in it keep their initialisation: %s", source, len(missing), missing)
    if extra:
        logger.info("%s: %d weights the model does not use are ignored (e.g. %s)", source, len(extra), extra[:3])


def arch_from_clip_config(cfg: Dict[str, Any], image_size: Sequence[int], head_width: int = HEAD_WIDTH,
                          context_length: Optional[int] = None, simclr_mlp: Optional[Sequence[int]] = None,
                          num_classes: Optional[int] = None) -> TBPSArch:
    """A TBPS architecture from a CLIP config (``model.pretrained.clip_config_from_state_dict`` / ``scratch_config``);
    TBPS is a ViT: a ResNet image encoder raises."""
    if isinstance(cfg["vision_layers"], (tuple, list)):
        raise ValueError("TBPS-CLIP needs a ViT image encoder; a ModifiedResNet CLIP was given")
    return TBPSArch(embed_dim=int(cfg["embed_dim"]), image_size=_pair(tuple(image_size)),
                    patch_size=int(cfg["vision_patch_size"]), vision_width=int(cfg["vision_width"]),
                    vision_layers=int(cfg["vision_layers"]),
                    vision_heads=max(int(cfg["vision_width"]) // head_width, 1),
                    context_length=int(context_length or cfg["context_length"]), vocab_size=int(cfg["vocab_size"]),
                    text_width=int(cfg["transformer_width"]), text_layers=int(cfg["transformer_layers"]),
                    text_heads=max(int(cfg["transformer_width"]) // head_width, 1),
                    simclr_mlp=tuple(int(d) for d in simclr_mlp) if simclr_mlp else None,
                    num_classes=int(num_classes) if num_classes else None)


def build_tbps(pretrain: str, image_size: Sequence[int], losses: Optional[TBPSLossConfig] = None,
               dropout: float = 0.05, text_length: int = 77, head_width: int = HEAD_WIDTH,
               simclr_mlp: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
               download_root: Optional[str] = None) -> TBPS:
    """A TBPS model to train or evaluate, from ``pretrain``: a TBPS checkpoint file (architecture and weights from
    it; its SS head kept, its classifier kept when it has ``num_classes`` classes), an IRRA-layout checkpoint
    (:func:`build_tbps_from_irra`), an OpenAI CLIP name / file (TBPS's ``original_clip`` loading) or
    ``scratch:<arch>`` (random weights). ``simclr_mlp`` / ``num_classes`` size the SS head and ID classifier that the
    weights do not have (a classifier of another size is made anew)."""
    losses = losses if losses is not None else TBPSLossConfig()
    mlp = tuple(int(d) for d in simclr_mlp) if simclr_mlp else None
    sd = _try_read_tbps(pretrain) if os.path.isfile(pretrain) else None
    if sd is not None:
        arch = arch_from_state_dict(sd, image_size, head_width, text_length)
        if mlp is not None and arch.simclr_mlp is None:
            arch.simclr_mlp = mlp
        if num_classes is not None and arch.num_classes != num_classes:
            sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
            arch.num_classes = int(num_classes)
        model = TBPS(arch, losses, dropout)
        load_tbps_weights(model, sd, source=pretrain)
        return model
    if is_pretrained_file(pretrain):
        clip_sd, irra_sd = load_pretrained_file(pretrain)  # read once; a CLIP file's weights as they are
        cfg = clip_config_from_state_dict(clip_sd)
        if irra_sd is not None:
            arch = arch_from_clip_config(cfg, image_size, head_width, text_length, mlp, num_classes)
            return build_tbps_from_irra(TBPS(arch, losses, dropout), clip_sd, irra_sd, pretrain)
    else:
        cfg, clip_sd = load_pretrained(pretrain, tuple(image_size), 16, download_root)
    arch = arch_from_clip_config(cfg, image_size, head_width, text_length, mlp, num_classes)
    model = TBPS(arch, losses, dropout)
    if clip_sd is not None:
        n = clip_sd["visual.positional_embedding"].shape[0] - 1
        side = math.isqrt(n)
        load_tbps_weights(model, clip_to_tbps_state_dict(clip_sd, text_length), source=pretrain,
                          old_grid=(side, side) if side * side == n else None)
    return model


def build_tbps_from_irra(model: TBPS, clip_sd: Dict[str, torch.Tensor], irra_sd: Dict[str, torch.Tensor],
                         source: str) -> TBPS:
    """TBPS ``model`` (built for the architecture of ``clip_sd``) started from the IRRA-layout checkpoint ``source``
    (e.g. MLLM4Text-ReID's person-pretrained weights): ``irra_sd`` its state dict (``module.`` stripped), ``clip_sd``
    its ``base_model.*`` (prefix removed). The backbone is checked against the model's (a mismatch raises naming the
    first mismatched key) and the load report by group is logged (``model/pretrain_report.py``; TBPS's heads and
    ``logit_scale`` are not in the checkpoint and keep their initialisation: IRRA's temperature is fixed); then the
    backbone is loaded through TBPS's CLIP-key mapping, the text positions interpolated to the context length as
    for a CLIP file, the image ones resized from the grid the checkpoint was trained on (the configs.yaml next to
    it, else inferred)."""
    from model.build import trained_image_grid  # model.build imports the method registry: import it on use

    load_pretrain_report(model, irra_sd, source, backbone_name=tbps_backbone_name)
    pos = image_positions(clip_sd)
    old_grid = trained_image_grid(source, pos) if pos is not None else None
    copy_tbps_weights(model, clip_to_tbps_state_dict(clip_sd, model.arch.context_length), source, old_grid)
    return model


def _try_read_tbps(path: str) -> Optional[Dict[str, torch.Tensor]]:
    """The TBPS state dict of ``path``, or None when it is not a TBPS checkpoint (e.g. an OpenAI CLIP archive)."""
    try:
        return read_tbps_checkpoint(path)
    except CheckpointReadError:
        return None
