"""Weights: every read of an external weight file into state dicts and architecture configs (no model class here).

Following a ``--pretrain_choice`` or a trained checkpoint into the model's weights means reading this module:

1. the image grid (the one function that maps an image size to the encoder's token grid, for both backbones);
2. OpenAI model names and their checked download (``_MODELS``, ``available_models``, ``_download``);
3. from-scratch architectures (``scratch:<arch>``, ``SCRATCH_ARCHS``);
4. CLIP files (OpenAI's TorchScript archives, plain or wrapped state dicts) and the architecture they imply
   (:func:`clip_config_from_state_dict`); positional embeddings resized to another image grid / text length;
5. IRRA checkpoints (ours, the original's ``best.pth``, with or without DDP's ``module.`` prefix): their CLIP
   backbone (``base_model.*``), number of identities, image grid;
6. :func:`load_pretrained`: a ``pretrain_choice`` (name, file, ``scratch:<arch>``) -> (architecture config, weights).

This module imports no model class: ``model/clip_model.py`` (the network) and ``model/build.py`` (IRRA) import it,
never the other way round. It does not know how a run directory is laid out either: an IRRA checkpoint's image grid
(when not square) is an argument, which ``model/build.py`` looks up in the ``configs.yaml`` next to the checkpoint.
Reading files goes through :mod:`utils.checkpoint` (``torch.load(weights_only=True)``, errors naming the file).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import urllib.error
import urllib.request
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from utils.checkpoint import CheckpointReadError, read_model_state_dict, strip_prefix_if_present, torch_load
from utils.run_dir import atomic_write

logger = logging.getLogger("IRRA.model.pretrained")

Size2 = Union[int, Tuple[int, int], Sequence[int]]


def _pair(x: Size2) -> Tuple[int, int]:
    """int -> (x, x); (h, w) -> (h, w)."""
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


# ----------------------------------------------------------------------------------------------------------------
# 1. the image grid
# ----------------------------------------------------------------------------------------------------------------
RESNET_DOWNSAMPLE = 32  # ModifiedResNet's total stride: its attention-pool grid is (H // 32, W // 32)


def image_grid(img_size: Size2, patch_size: Optional[int], stride_size: Optional[int] = None) -> Tuple[int, int]:
    """``(rows, cols)`` of the image tokens (class / mean token aside) the image encoder makes of ``img_size`` (H, W).

    - ViT (``patch_size`` given; :class:`~model.clip_model.VisionTransformer`): ``rows = (H - patch_size) //
      stride_size + 1``, the same for cols / W;
    - ModifiedResNet (``patch_size`` None, as CLIP's ``vision_patch_size``): ``(H // 32, W // 32)``
      (``RESNET_DOWNSAMPLE``); ``stride_size`` is unused.
    """
    height, width = _pair(img_size)
    if patch_size is None:
        return height // RESNET_DOWNSAMPLE, width // RESNET_DOWNSAMPLE
    if stride_size is None:
        raise ValueError("image_grid: a ViT grid needs stride_size")
    return (height - patch_size) // stride_size + 1, (width - patch_size) // stride_size + 1


class ImagePositions(NamedTuple):
    """The image positional embedding of CLIP weights: its key, its number of grid positions (the class / mean
    token aside), the ViT patch size (None for ModifiedResNet, as :func:`image_grid` takes it)."""
    key: str
    count: int
    patch_size: Optional[int]


def image_positions(clip_state_dict: Dict[str, torch.Tensor]) -> Optional[ImagePositions]:
    """:class:`ImagePositions` of CLIP weights in OpenAI names (ViT or ModifiedResNet); None when it has neither."""
    if "visual.positional_embedding" in clip_state_dict and "visual.conv1.weight" in clip_state_dict:  # ViT
        key = "visual.positional_embedding"
        patch: Optional[int] = int(clip_state_dict["visual.conv1.weight"].shape[-1])
    elif "visual.attnpool.positional_embedding" in clip_state_dict:  # ModifiedResNet
        key, patch = "visual.attnpool.positional_embedding", None
    else:
        return None
    return ImagePositions(key, int(clip_state_dict[key].shape[0]) - 1, patch)


# ----------------------------------------------------------------------------------------------------------------
# 2. OpenAI names and download
# ----------------------------------------------------------------------------------------------------------------
# OpenAI's public CLIP weights; the second-last URL path component is the file's SHA256.
# Copied from openai/CLIP clip/clip.py (identical in the PyPI packages openai-clip 1.0.1 and clip-anytorch 2.6.0).
_MODELS: Dict[str, str] = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

DEFAULT_DOWNLOAD_ROOT = os.path.join("~", ".cache", "clip")
DOWNLOAD_TIMEOUT_S = 10.0  # socket timeout for the weight download: fail fast when offline


def available_models() -> List[str]:
    """Names of the OpenAI CLIP models that can be downloaded."""
    return list(_MODELS.keys())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, root: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> str:
    """Return the local path of ``url`` under ``root``, downloading it if absent (SHA256 checked).

    The expected SHA256 is the second-last path component of the URL. An existing file with the wrong checksum,
    or a download with the wrong checksum, is an error (no re-download loop). If the file is absent and the
    download fails (offline...), one FileNotFoundError names the expected path and the URL to fetch by hand.
    """
    root = os.path.expanduser(root)
    filename = os.path.basename(url)
    expected_sha256 = url.split("/")[-2]
    download_target = os.path.join(root, filename)
    if os.path.exists(download_target) and not os.path.isfile(download_target):
        raise RuntimeError(f"{download_target} exists and is not a regular file")
    if os.path.isfile(download_target):
        got = _sha256(download_target)
        if got != expected_sha256:
            raise RuntimeError(
                f"{download_target} exists but its SHA256 {got} does not match the expected {expected_sha256}; "
                f"delete it and fetch {url} again")
        return download_target

    from tqdm import tqdm

    def fetch(output) -> None:  # streamed into atomic_write's temporary file, hashed on the way
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as source:
            total = source.info().get("Content-Length")
            with tqdm(total=int(total) if total else None, ncols=80, unit="iB", unit_scale=True,
                      desc=filename) as loop:
                while True:
                    buffer = source.read(1 << 16)
                    if not buffer:
                        break
                    output.write(buffer)
                    h.update(buffer)
                    loop.update(len(buffer))
        if h.hexdigest() != expected_sha256:
            raise _ChecksumError(
                f"downloaded {url} but its SHA256 {h.hexdigest()} does not match the expected {expected_sha256}")

    try:
        os.makedirs(root, exist_ok=True)
        atomic_write(download_target, fetch, binary=True)  # nothing is left behind on any failure
    except _ChecksumError as e:
        raise RuntimeError(str(e)) from None
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(
            f"CLIP weights not found at {download_target} and the download failed ({e}). Without network access, "
            f"fetch {url} by hand and place it at {download_target} (or pass the file path as --pretrain_choice)."
        ) from None
    return download_target


class _ChecksumError(Exception):
    """A downloaded file whose SHA256 is not the one in its URL (raised inside the write, so none is kept)."""


# ----------------------------------------------------------------------------------------------------------------
# 3. from-scratch architectures
# ----------------------------------------------------------------------------------------------------------------
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408)
# From-scratch architectures for ``pretrain_choice="scratch:<arch>"`` (randomly initialised as CLIP does).
# Text heads = transformer_width // 64 (at least 1); ViT heads = vision_width // 64; ResNet heads = width*32 // 64.
SCRATCH_ARCHS: Dict[str, Dict[str, Any]] = {
    # 64-wide, 1 vision + 1 text layer: unit tests.
    "ViT-Micro": dict(embed_dim=64, vision_layers=1, vision_width=64, vision_patch_size=16,
                      transformer_width=64, transformer_layers=1, **_TEXT_DEFAULTS),
    # 128-wide, 2 vision + 2 text layers: the CPU demo / benchmark size (same as the conformance tiny CLIP).
    "ViT-Tiny": dict(embed_dim=128, vision_layers=2, vision_width=128, vision_patch_size=16,
                     transformer_width=128, transformer_layers=2, **_TEXT_DEFAULTS),
    # ModifiedResNet with one bottleneck per stage, stem width 8 (feature dim 8*32 = 256), 128-wide 2-layer text.
    "RN-Tiny": dict(embed_dim=128, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None,
                    transformer_width=128, transformer_layers=2, **_TEXT_DEFAULTS),
    # OpenAI shapes, random weights.
    "ViT-B/16": dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16,
                     transformer_width=512, transformer_layers=12, **_TEXT_DEFAULTS),
    "ViT-B/32": dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=32,
                     transformer_width=512, transformer_layers=12, **_TEXT_DEFAULTS),
    "RN50": dict(embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None,
                 transformer_width=512, transformer_layers=12, **_TEXT_DEFAULTS),
}
SCRATCH_PREFIX = "scratch:"


def scratch_config(name: str) -> Dict[str, Any]:
    """The architecture config of ``scratch:<arch>`` ``name`` (``SCRATCH_ARCHS``; heads derived as CLIP's)."""
    arch = name[len(SCRATCH_PREFIX):]
    if arch not in SCRATCH_ARCHS:
        raise ValueError(f"unknown scratch architecture {arch!r}; valid: "
                         f"{', '.join(SCRATCH_PREFIX + a for a in SCRATCH_ARCHS)}")
    cfg = dict(SCRATCH_ARCHS[arch])
    cfg["transformer_heads"] = max(cfg["transformer_width"] // 64, 1)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# 4. CLIP files, the architecture they imply, positional embeddings for another grid / text length
# ----------------------------------------------------------------------------------------------------------------
def _unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """Accept a state dict or a {"state_dict": sd} / {"model": sd} wrapper."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"expected a CLIP state dict, got {type(obj).__name__}")
    return obj


def load_clip_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict from a TorchScript archive (OpenAI's .pt), a plain state dict, or a {"state_dict": ...} /
    {"model": ...} wrapper (an IRRA checkpoint comes back whole: ``base_model.*``, ``classifier.*``...). Tensors are
    returned on CPU in their stored dtype. A file torch cannot read raises
    :class:`~utils.checkpoint.CheckpointReadError` naming it (see :func:`utils.checkpoint.torch_load`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    except (RuntimeError, ValueError, AttributeError):
        state_dict = torch_load(path)  # not TorchScript: a torch.save file (weights_only=True)
    try:
        sd = _unwrap_state_dict(state_dict)
    except ValueError as e:
        raise CheckpointReadError(f"{path}: {e}") from None
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def clip_config_from_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Derive CLIP's architecture from an OpenAI state dict (as OpenAI's build_model): the keyword arguments of
    :class:`~model.clip_model.CLIP` less ``stride_size``; ``image_resolution`` is the square size the weights were
    trained at (callers replace it with the size to build)."""
    vit = "visual.proj" in state_dict
    try:
        if vit:
            vision_width = state_dict["visual.conv1.weight"].shape[0]
            vision_layers: Union[int, Tuple[int, ...]] = len(
                [k for k in state_dict if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
            vision_patch_size = state_dict["visual.conv1.weight"].shape[-1]
            grid_size = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            image_resolution = vision_patch_size * grid_size
        else:
            counts = [len(set(k.split(".")[2] for k in state_dict if k.startswith(f"visual.layer{b}")))
                      for b in [1, 2, 3, 4]]
            vision_layers = tuple(counts)
            vision_width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
            output_width = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision_patch_size = None
            image_resolution = output_width * RESNET_DOWNSAMPLE
        embed_dim = state_dict["text_projection"].shape[1]
        context_length = state_dict["positional_embedding"].shape[0]
        vocab_size = state_dict["token_embedding.weight"].shape[0]
        transformer_width = state_dict["ln_final.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an OpenAI CLIP state dict: missing {e}") from None
    transformer_heads = max(transformer_width // 64, 1)
    transformer_layers = len(set(k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks")))
    return dict(embed_dim=embed_dim, image_resolution=image_resolution, vision_layers=vision_layers,
                vision_width=vision_width, vision_patch_size=vision_patch_size, context_length=context_length,
                vocab_size=vocab_size, transformer_width=transformer_width, transformer_heads=transformer_heads,
                transformer_layers=transformer_layers)


def resize_pos_embed(posemb: torch.Tensor, posemb_new: Optional[torch.Tensor], hight: int, width: int,
                     old_grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Resize a ViT/attnpool positional embedding [1 + gh*gw, D] to [1 + hight*width, D].

    Token 0 (class/mean token) is kept; the grid is resized with bilinear interpolation (align_corners=False).
    ``old_grid``: (gh, gw) of ``posemb``; None: a square grid (CLIP's, as the original assumes). ``posemb_new``
    is the original's parameter and is not used (the new shape is ``hight`` x ``width``); pass None.
    """
    posemb = posemb.unsqueeze(0)  # [1+gh*gw, D] -> [1, 1+gh*gw, D]
    posemb_token, posemb_grid = posemb[:, :1], posemb[0, 1:]
    if old_grid is None:
        gs_old = int(math.sqrt(len(posemb_grid)))
        old_grid = (gs_old, gs_old)
    gh, gw = old_grid
    if gh * gw != len(posemb_grid):
        raise ValueError(f"resize_pos_embed: the old grid has {len(posemb_grid)} positions, not a {gh}x{gw} grid")
    logger.info("Resized position embedding from size %s to size %s with height:%d width:%d",
                tuple(posemb.shape), (1, 1 + hight * width, posemb.shape[-1]), hight, width)
    dtype = posemb.dtype
    posemb_grid = posemb_grid.float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # [gh*gw, D] -> [1, D, gh, gw]
    posemb_grid = F.interpolate(posemb_grid, size=(hight, width), mode="bilinear")  # [1, D, hight, width]
    posemb_grid = posemb_grid.permute(0, 2, 3, 1).reshape(1, hight * width, -1)  # [1, D, h, w] -> [1, h*w, D]
    posemb = torch.cat([posemb_token, posemb_grid.to(dtype)], dim=1)  # [1, 1+h*w, D]
    return posemb.squeeze(0)  # [1, 1+h*w, D] -> [1+h*w, D]


def resize_text_pos_embed(posemb: torch.Tensor, context_length: int) -> torch.Tensor:
    """Text positional embedding [L_old, D] -> [context_length, D].

    Shorter: the first ``context_length`` rows (identical results for the kept positions, causal attention).
    Longer: 1-D linear interpolation along positions (``F.interpolate(mode="linear", align_corners=False)``).
    """
    old_len = posemb.shape[0]
    if context_length <= old_len:
        return posemb[:context_length].clone()
    dtype = posemb.dtype
    x = posemb.float().t().unsqueeze(0)  # [L_old, D] -> [1, D, L_old]
    x = F.interpolate(x, size=context_length, mode="linear", align_corners=False)  # [1, D, context_length]
    return x.squeeze(0).t().contiguous().to(dtype)  # [1, D, L] -> [L, D]


# ----------------------------------------------------------------------------------------------------------------
# 5. IRRA checkpoints (ours and the original's: {"model": {"base_model.*": CLIP, "classifier.*", ...}})
# ----------------------------------------------------------------------------------------------------------------
BACKBONE_PREFIX = "base_model."  # IRRA's CLIP backbone in the state dict (the original's name)


def is_irra_state_dict(state_dict: Dict[str, Any]) -> bool:
    """True when ``state_dict`` holds IRRA weights (some key starts with ``base_model.`` once a ``module.`` prefix is
    stripped); False for a CLIP state dict."""
    return any(k.startswith(BACKBONE_PREFIX) for k in strip_prefix_if_present(state_dict, "module."))


def clip_state_dict_from_checkpoint(f: Union[str, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The CLIP weights (``base_model.*``, prefix removed) of an IRRA checkpoint (a path, or its
    ``read_model_state_dict``): enough to rebuild its backbone without the pretrained CLIP file
    (``build_model(..., clip_state_dict=...)``)."""
    prefix = BACKBONE_PREFIX
    full = read_model_state_dict(f) if isinstance(f, str) else strip_prefix_if_present(f, "module.")
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{f if isinstance(f, str) else 'checkpoint'}: no base_model.* weights: not an IRRA checkpoint")
    return sd


def checkpoint_num_classes(f: Union[str, Dict[str, torch.Tensor]], default: Optional[int] = None) -> Optional[int]:
    """Number of identities of the ID classifier in checkpoint ``f`` (a path, or its ``read_model_state_dict``);
    ``default`` when it has none."""
    w = (read_model_state_dict(f) if isinstance(f, str) else f).get("classifier.weight")
    return int(w.shape[0]) if w is not None else default


def check_image_grid(clip_state_dict: Dict[str, torch.Tensor], img_size: Size2, stride_size: int,
                     source: str = "checkpoint", config: str = "the config") -> None:
    """Raise a ValueError when the image grid of trained CLIP weights does not fit ``img_size`` / ``stride_size``.

    A trained IRRA checkpoint holds the positional embedding of the grid it was trained on; a config with another
    image size or stride would otherwise fail deep inside the positional-embedding resize (or load resized weights
    the model never saw).

    Args:
        clip_state_dict: CLIP weights in OpenAI names (:func:`clip_state_dict_from_checkpoint`).
        img_size: the config's ``img_size`` (H, W).
        stride_size: the config's ``stride_size`` (ViT only).
        source: the checkpoint, named in the message.
        config: the config file, named in the message.
    """
    pos = image_positions(clip_state_dict)
    if pos is None:
        return
    height, width = _pair(img_size)
    num_y, num_x = image_grid((height, width), pos.patch_size, stride_size)
    if pos.patch_size is not None:
        how = f"img_size {height}x{width} with stride_size {stride_size} (patch {pos.patch_size})"
    else:
        how = f"img_size {height}x{width} (ResNet: a grid of H/{RESNET_DOWNSAMPLE} x W/{RESNET_DOWNSAMPLE})"
    if pos.count != num_y * num_x:
        raise ValueError(
            f"{config} does not fit {source}: the checkpoint's image encoder was trained on a grid of {pos.count} "
            f"patch positions, but the config's {how} implies a {num_y}x{num_x} grid of {num_y * num_x} positions. "
            f"Use the configs.yaml of the run that wrote the checkpoint (or its img_size / stride_size).")


def infer_image_grid(n: int, new_grid: Tuple[int, int], source: str = "checkpoint") -> Tuple[int, int]:
    """The one (rows, cols) grid of ``n`` positions among: the width of ``new_grid``, its height, its aspect ratio,
    a square (e.g. 4x2 for 8 positions and a new 6x2 grid). None or several -> ValueError naming ``source``."""
    ny, nx = new_grid
    candidates = []
    if n % nx == 0:
        candidates.append((n // nx, nx))  # same width (e.g. 384x128 -> 256x128)
    if n % ny == 0:
        candidates.append((ny, n // ny))  # same height
    h = round(math.sqrt(n * ny / nx))
    if h > 0 and n % h == 0 and h * nx == (n // h) * ny:
        candidates.append((h, n // h))  # same aspect ratio
    s = math.isqrt(n)
    if s * s == n:
        candidates.append((s, s))  # square (CLIP's)
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) != 1:
        raise ValueError(
            f"{source}: cannot tell the image grid of its {n} positional embeddings (its img_size) to resize them to "
            f"{ny}x{nx}: {'candidates ' + str(candidates) if candidates else 'no grid fits'}; put the configs.yaml "
            f"of the run that wrote it (with img_size and stride_size) next to it, or train at its img_size")
    logger.info("%s: image positional grid %dx%d assumed (no configs.yaml next to it gives its img_size)", source,
                *candidates[0])
    return candidates[0]


def resize_image_pos_embed(clip_state_dict: Dict[str, torch.Tensor], image_size: Size2, stride_size: int,
                           old_grid: Optional[Tuple[int, int]] = None, source: str = "checkpoint"
                           ) -> Dict[str, torch.Tensor]:
    """``clip_state_dict`` with its image positional embedding (``visual.positional_embedding`` for a ViT,
    ``visual.attnpool.positional_embedding`` for a ModifiedResNet) resized to the grid of ``image_size`` /
    ``stride_size`` when its number of positions differs (a new dict; the same one otherwise).

    ``old_grid``: the (rows, cols) grid the weights were trained on (an IRRA checkpoint's need not be square:
    384x128 -> 24x8); None: inferred (:func:`infer_image_grid`, an error naming ``source`` when ambiguous).
    """
    pos = image_positions(clip_state_dict)
    if pos is None:
        return clip_state_dict
    new_grid = image_grid(image_size, pos.patch_size, stride_size)
    if pos.count == new_grid[0] * new_grid[1]:
        return clip_state_dict
    if old_grid is None:
        old_grid = infer_image_grid(pos.count, new_grid, source)
    out = dict(clip_state_dict)
    out[pos.key] = resize_pos_embed(clip_state_dict[pos.key], None, *new_grid, old_grid=old_grid)
    return out


# ----------------------------------------------------------------------------------------------------------------
# 6. a pretrain_choice -> (architecture config, weights)
# ----------------------------------------------------------------------------------------------------------------
def is_pretrained_file(name: str) -> bool:
    """True when ``pretrain_choice`` ``name`` is read from a local file: not an OpenAI model name
    (``available_models()``, which wins over a file of the same name), not ``scratch:<arch>``, an existing file."""
    return name not in _MODELS and not name.startswith(SCRATCH_PREFIX) and os.path.isfile(name)


def load_pretrained_file(path: str, image_size: Optional[Size2] = None, stride_size: Optional[int] = None,
                         old_grid: Optional[Tuple[int, int]] = None
                         ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """Weights of a ``pretrain_choice`` file: an OpenAI CLIP file (TorchScript archive or state dict, see
    :func:`load_clip_state_dict`) or an IRRA checkpoint (the original's ``best.pth`` layout
    ``{"model": {"base_model.*": ..., ...}}``, optionally with a ``module.`` prefix, or its bare state dict).

    Returns ``(clip_state_dict, irra_state_dict)``: the CLIP weights (an IRRA checkpoint's ``base_model.*``, prefix
    removed) and, for an IRRA checkpoint, its whole state dict as stored (``module.`` stripped; None for a CLIP
    file). An IRRA checkpoint is recognised by its keys (some key starts with ``base_model.``). Errors name the file.

    Given ``image_size`` / ``stride_size`` (the model to build), an IRRA checkpoint's image positional embedding is
    resized here (:func:`resize_image_pos_embed`; its grid ``old_grid``, or inferred when None); a CLIP file's square
    grid is resized by :meth:`~model.clip_model.CLIP.load_param`.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v  # per key, as MLLM4Text-ReID's finetune.py
          for k, v in load_clip_state_dict(path).items()}
    irra_sd = sd if is_irra_state_dict(sd) else None
    clip_sd = clip_state_dict_from_checkpoint(sd) if irra_sd is not None else sd
    try:
        clip_config_from_state_dict(clip_sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e} (expected an OpenAI CLIP file or an IRRA checkpoint)") from None
    if irra_sd is not None and image_size is not None and stride_size is not None:
        clip_sd = resize_image_pos_embed(clip_sd, image_size, stride_size, old_grid=old_grid, source=path)
    return clip_sd, irra_sd


def load_pretrained(name: str, image_size: Size2, stride_size: int, download_root: Optional[str] = None,
                    old_grid: Optional[Tuple[int, int]] = None
                    ) -> Tuple[Dict[str, Any], Optional[Dict[str, torch.Tensor]]]:
    """``(architecture config, CLIP weights)`` of ``pretrain_choice`` ``name``: an OpenAI model name (downloaded to
    ``download_root`` or ~/.cache/clip), a CLIP file or an IRRA checkpoint (its ``base_model.*``, image grid resized
    for ``image_size`` / ``stride_size`` from ``old_grid``, see :func:`load_pretrained_file`), or
    ``scratch:<arch>`` (weights None: random init). Unknown names raise listing the valid ones."""
    if name.startswith(SCRATCH_PREFIX):
        return scratch_config(name), None
    if name in _MODELS:
        path = _download(_MODELS[name], download_root or DEFAULT_DOWNLOAD_ROOT)
    elif os.path.isfile(name):
        path = name
    else:
        raise ValueError(
            f"pretrain_choice {name!r}: not an OpenAI CLIP model name, a {SCRATCH_PREFIX}<arch> or an existing "
            f"file; OpenAI models: {available_models()}; scratch: {[SCRATCH_PREFIX + a for a in SCRATCH_ARCHS]}")
    state_dict, _ = load_pretrained_file(path, image_size, stride_size, old_grid=old_grid)
    return clip_config_from_state_dict(state_dict), state_dict
