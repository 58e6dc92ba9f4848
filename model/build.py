"""IRRA: CLIP backbone + SDM/ITC/CMPM/ID losses + implicit relation reasoning (cross-modal MLM)."""
from __future__ import annotations

import argparse
import logging
from collections import OrderedDict
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from model import objectives
from model.clip_model import (LayerNorm, QuickGELU, Transformer, build_CLIP_from_openai_pretrained, convert_weights,
                              check_image_grid, init_transformer_, is_pretrained_file, load_pretrained_file)
from utils.choices import LOSSES as VALID_LOSSES
from utils.choices import PRECISIONS as VALID_PRECISIONS
from utils.choices import RDE_LOSSES, parse_loss_names
from utils.checkpoint import (BACKBONE_PREFIX, checkpoint_num_classes, clip_state_dict_from_checkpoint, count_by_module,
                              load_matching_state_dict, load_state_dict, summarize_names)
from utils.comm import all_reduce_sum, gather_with_grad, get_world_size, resolve_device, scale_grad
from model.rde import RDE, checkpoint_kind, rde_loss_name  # noqa: E402,F401  (RDE's name, as RDE's model/build.py)

logger = logging.getLogger("IRRA.model.build")

HEAD_DIM = 64  # attention head width of the cross-modal modules (heads = embed_dim // 64), as the original


class IRRA(nn.Module):
    """IRRA model. ``forward(batch)`` returns a dict of losses/accuracies (keys as the original).

    Speed switch ``self.fast`` (default True; numbers identical to False up to float rounding):
    (a) the MLM head is applied only at masked positions (label != 0), and the last cross-modal block computes
        queries only up to the last masked position (keys/values still cover every position);
    (b) caption ids are cut to the longest caption of the batch before the text transformer on the caption path
        (causal attention + EOT pooling make this exact). ``mlm_ids`` are NOT cut: the cross-modal transformer
        attends over all text positions (padding included), so cutting them would change the MLM loss.

    Under DDP (world size > 1, unless ``args.local_negatives``) every loss is over the global batch: image/text
    features and pids are gathered from all ranks for SDM/ITC/CMPM, and the MLM loss and accuracy are means over
    all masked tokens of the global batch. Gradients are scaled so that DDP's averaging gives exactly the gradient of
    one process on the whole batch; the returned values are the global ones on every rank.

    Options read once from ``args``: loss_names, temperature, id_loss_weight, mlm_loss_weight, cmt_depth,
    vocab_size, text_length, img_size, stride_size, pretrain_choice, clip_download_root, local_negatives.
    """

    def __init__(self, args: argparse.Namespace, num_classes: int = 11003,
                 clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """``clip_state_dict``: build the CLIP from these weights instead of ``args.pretrain_choice`` (used to
        rebuild a trained model from its own checkpoint, without the pretrained CLIP file)."""
        super().__init__()
        self.num_classes = num_classes
        self._set_task(args.loss_names)
        self.id_loss_weight = float(args.id_loss_weight)
        self.mlm_loss_weight = float(args.mlm_loss_weight)
        self.local_negatives = bool(args.local_negatives)
        self.fast = True
        self.base_model, base_cfg = build_CLIP_from_openai_pretrained(
            args.pretrain_choice, args.img_size, args.stride_size, download_root=args.clip_download_root,
            text_length=args.text_length, state_dict=clip_state_dict)
        self.embed_dim = base_cfg["embed_dim"]
        self.vocab_size = args.vocab_size
        if self.vocab_size != base_cfg["vocab_size"]:
            raise ValueError(f"--vocab_size {self.vocab_size} differs from the CLIP vocabulary ({base_cfg['vocab_size']})")
        # fixed temperature (not learned): a non-persistent buffer so it follows .to(device) and stays out of
        # the state dict (original checkpoints have no such key)
        self.register_buffer("logit_scale", torch.ones([]) * (1 / args.temperature), persistent=False)

        if "id" in self.current_task:
            self.classifier = nn.Linear(self.embed_dim, self.num_classes)
            nn.init.normal_(self.classifier.weight.data, std=0.001)
            nn.init.constant_(self.classifier.bias.data, val=0.0)

        if "mlm" in self.current_task:
            heads = max(self.embed_dim // HEAD_DIM, 1)
            self.cross_attn = nn.MultiheadAttention(self.embed_dim, heads, batch_first=True)
            self.cross_modal_transformer = Transformer(width=self.embed_dim, layers=args.cmt_depth, heads=heads)
            self.ln_pre_t = LayerNorm(self.embed_dim)
            self.ln_pre_i = LayerNorm(self.embed_dim)
            self.ln_post = LayerNorm(self.embed_dim)
            std = init_transformer_(self.cross_modal_transformer)  # as CLIP's text transformer
            proj_std, attn_std, fc_std = std["proj_std"], std["attn_std"], std["fc_std"]
            # init cross attn
            nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
            nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
            self.mlm_head = nn.Sequential(OrderedDict([
                ("dense", nn.Linear(self.embed_dim, self.embed_dim)),
                ("gelu", QuickGELU()),
                ("ln", LayerNorm(self.embed_dim)),
                ("fc", nn.Linear(self.embed_dim, self.vocab_size)),
            ]))
            # init mlm head
            nn.init.normal_(self.mlm_head.dense.weight, std=fc_std)
            nn.init.normal_(self.mlm_head.fc.weight, std=proj_std)

    def _set_task(self, loss_names: str) -> None:
        self.current_task = parse_loss_names(loss_names)
        logger.info("Training Model with %s tasks", self.current_task)

    def cross_former(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     query_len: Optional[int] = None) -> torch.Tensor:
        """Text tokens q [B, L, D] attend to image tokens k/v [B, P, D], then cmt_depth self-attention blocks.

        ``query_len``: only the first ``query_len`` output positions are needed; the last block then computes
        its queries/MLP for those positions only (keys/values still cover all L positions, so the kept outputs
        are unchanged). Returns [B, L, D] (or [B, query_len, D]). The blocks are checkpointed when
        ``set_grad_checkpointing`` turned it on (the fast path's last block included).
        """
        x = self.cross_attn(self.ln_pre_t(q), self.ln_pre_i(k), self.ln_pre_i(v), need_weights=False)[0]
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.cross_modal_transformer(x, query_len=query_len)  # [L or query_len, B, D]
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_post(x)
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the residual blocks of the image (ViT), text and cross-modal transformers:
        their activations are recomputed in the backward pass instead of kept (less memory, ~1 more forward of
        compute, identical losses and gradients). A ModifiedResNet image encoder is left as it is: recomputing
        its BatchNorm layers in training would update their running statistics twice."""
        transformers = [self.base_model.transformer]
        visual_transformer = getattr(self.base_model.visual, "transformer", None)  # a ViT's; a ModifiedResNet has none
        if isinstance(visual_transformer, Transformer):
            transformers.append(visual_transformer)
        else:
            logger.info("grad checkpointing: the %s image encoder is not checkpointed (BatchNorm)",
                        type(self.base_model.visual).__name__)
        if "mlm" in self.current_task:
            transformers.append(self.cross_modal_transformer)
        for transformer in transformers:
            transformer.grad_checkpointing = bool(enable)

    @staticmethod
    def _cut_text(text: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L'] with L' = 1 + the largest EOT position (EOT = argmax id) in the batch."""
        length = int(text.argmax(dim=-1).max().item()) + 1
        return text[:, :length]

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] float (CLS token for ViT, attention-pooled token for ResNet)."""
        x = self.base_model.encode_image(image)
        return x[:, 0, :].float()

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, D] float (features at the EOT token)."""
        if self.fast:
            text = self._cut_text(text)
        x = self.base_model.encode_text(text)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)].float()

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """batch: images [B,3,H,W], caption_ids [B,L], pids [B] (+ mlm_ids, mlm_labels [B,L] for mlm)."""
        ret: Dict[str, torch.Tensor] = dict()
        images = batch["images"]
        caption_ids = batch["caption_ids"]
        if self.fast:
            caption_ids = self._cut_text(caption_ids)
        image_feats, text_feats = self.base_model(images, caption_ids)  # [B, 1+P, D], [B, L, D]
        i_feats = image_feats[:, 0, :].float()
        t_feats = text_feats[torch.arange(text_feats.shape[0]), caption_ids.argmax(dim=-1)].float()

        logit_scale = self.logit_scale
        ret.update({"temperature": 1 / logit_scale})

        world = 1 if self.local_negatives else get_world_size()
        if world > 1 and {"itc", "sdm", "cmpm"} & set(self.current_task):
            # [b, D] per rank -> [world * b, D]: the contrastive losses see the global batch (see class docstring)
            all_i, all_t, all_pids = gather_with_grad(i_feats), gather_with_grad(t_feats), gather_with_grad(batch["pids"])
        else:
            all_i, all_t, all_pids = i_feats, t_feats, batch["pids"]

        if "itc" in self.current_task:
            ret.update({"itc_loss": scale_grad(objectives.compute_itc(all_i, all_t, logit_scale), world)})

        if "sdm" in self.current_task:
            ret.update({"sdm_loss": scale_grad(objectives.compute_sdm(all_i, all_t, all_pids, logit_scale), world)})

        if "cmpm" in self.current_task:
            ret.update({"cmpm_loss": scale_grad(objectives.compute_cmpm(all_i, all_t, all_pids), world)})

        if "id" in self.current_task:
            wdtype = self.classifier.weight.dtype  # the original casts with .half() (its weights are always fp16)
            image_logits = self.classifier(i_feats.to(wdtype)).float()
            text_logits = self.classifier(t_feats.to(wdtype)).float()
            id_loss = objectives.compute_id(image_logits, text_logits, batch["pids"]) * self.id_loss_weight
            ret.update({"id_loss": id_loss})
            image_pred = torch.argmax(image_logits, dim=1)
            text_pred = torch.argmax(text_logits, dim=1)
            ret.update({"img_acc": (image_pred == batch["pids"]).float().mean()})
            ret.update({"txt_acc": (text_pred == batch["pids"]).float().mean()})

        if "mlm" in self.current_task:
            if "mlm_ids" not in batch or "mlm_labels" not in batch:
                raise KeyError("loss 'mlm' needs batch['mlm_ids'] and batch['mlm_labels'] (build the data with --MLM)")
            mlm_ids = batch["mlm_ids"]  # full length: see the class docstring
            mlm_feats = self.base_model.encode_text(mlm_ids)  # [B, L, D]
            if self.fast:
                labels = batch["mlm_labels"]  # [B, L]
                query_len = int(torch.nonzero(labels)[:, 1].max().item()) + 1 if bool((labels != 0).any()) else 1
                x = self.cross_former(mlm_feats, image_feats, image_feats, query_len=query_len)  # [B, query_len, D]
                keep = labels[:, :query_len] != 0  # [B, query_len]
                mlm_labels = labels[:, :query_len][keep]  # [M]
                scores = self.mlm_head(x[keep]).float()  # [B, query_len, D] -> [M, D] -> [M, vocab]
            else:
                x = self.cross_former(mlm_feats, image_feats, image_feats)  # [B, L, D]
                x = self.mlm_head(x)  # [B, L, vocab]
                scores = x.float().reshape(-1, self.vocab_size)  # [B, L, vocab] -> [B*L, vocab]
                mlm_labels = batch["mlm_labels"].reshape(-1)  # [B, L] -> [B*L]
            if world > 1:
                mlm_loss, acc = self._global_mlm(scores, mlm_labels, world)
            else:
                mlm_loss = objectives.compute_mlm(scores, mlm_labels)
                pred = scores.max(1)[1]
                mlm_label_idx = torch.nonzero(mlm_labels)
                acc = (pred[mlm_label_idx] == mlm_labels[mlm_label_idx]).float().mean()
            ret.update({"mlm_loss": mlm_loss * self.mlm_loss_weight})
            ret.update({"mlm_acc": acc})

        return ret


    @staticmethod
    def _global_mlm(scores: torch.Tensor, labels: torch.Tensor, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """MLM loss and accuracy over every masked token of the global batch (scores [M, V], labels [M], 0 =
        ignored). The value is the global mean on every rank; the gradient is this rank's share, scaled by
        ``world`` against DDP's averaging."""
        ce_sum = F.cross_entropy(scores, labels, ignore_index=0, reduction="sum")
        masked = labels != 0
        correct = (scores.argmax(dim=1) == labels) & masked
        totals = all_reduce_sum(torch.stack([ce_sum.detach(), masked.sum().float(), correct.sum().float()]))
        loss_value, count = totals[0] / totals[1], totals[1]
        local = ce_sum * (world / count)  # this rank's share of the global mean, times world
        return loss_value + (local - local.detach()), totals[2] / count


def build_model(args: argparse.Namespace, num_classes: int = 11003,
                device: Optional[Union[str, torch.device]] = None,
                clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Union[IRRA, RDE]:
    """Build IRRA, or RDE when ``args.loss_names`` is an RDE loss (``model/rde.py``), (on CPU) and apply the precision rule for the target ``device``.

    ``args.pretrain_choice`` may be an IRRA checkpoint (the original's ``best.pth``, ours, with a ``module.`` prefix
    or a bare state dict; recognised by its ``base_model.*`` keys) to fine-tune from: the backbone is built from its
    ``base_model.*`` weights (architecture read from them, positional embeddings resized to ``img_size`` /
    ``text_length`` as for a CLIP file), then every other tensor whose name and shape match is loaded; the others
    (e.g. a classifier for another number of identities) keep their initialisation. The log lists what was loaded,
    resized and skipped.

    ``args.precision``: fp16 -> convert_weights (OpenAI fp16 weights); auto -> fp16 when the target device
    (``device`` or ``args.device``) is the accelerator, fp32 otherwise; fp32 / amp_bf16 / amp_fp16 -> fp32
    weights (the trainer autocasts for amp_*). ``args.grad_checkpointing``: :meth:`IRRA.set_grad_checkpointing`
    (activation checkpointing of the blocks). ``clip_state_dict``: see :class:`IRRA` (``pretrain_choice`` is then
    not read).
    """
    precision = args.precision
    if precision not in VALID_PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(VALID_PRECISIONS)}")
    device = torch.device(device) if device is not None else resolve_device(args.device)
    irra_state_dict = None
    if clip_state_dict is None and is_pretrained_file(args.pretrain_choice):
        # the file is read once; an IRRA checkpoint's image positional grid is resized there (it may be non-square)
        clip_state_dict, irra_state_dict = load_pretrained_file(args.pretrain_choice, args.img_size, args.stride_size)
    # an RDE loss name (tal / trl / rde_infonce / rde_sdm, utils/options.py) selects RDE; otherwise IRRA
    model_cls = RDE if rde_loss_name(parse_loss_names(args.loss_names, VALID_LOSSES + RDE_LOSSES)) else IRRA
    model = model_cls(args, num_classes, clip_state_dict=clip_state_dict)
    if irra_state_dict is not None:
        _load_irra_pretrain(model, irra_state_dict, args.pretrain_choice)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if precision == "fp16" or (precision == "auto" and device.type != "cpu"):
        convert_weights(model)
        logger.info("model weights converted to fp16 (precision=%s, device=%s)", precision, device)
    return model


def _load_irra_pretrain(model: IRRA, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """After the backbone was built from the ``base_model.*`` weights of the IRRA ``state_dict`` (positional
    embeddings resized), load its other tensors whose name and shape match and log what was loaded / resized /
    skipped."""
    report = load_matching_state_dict(model, state_dict, ignore_prefixes=(BACKBONE_PREFIX,))
    base = model.base_model.state_dict()
    loaded, resized, unexpected = [], [], []
    for name, v in state_dict.items():  # the backbone's weights as stored, before the resize
        if not name.startswith(BACKBONE_PREFIX):
            continue
        k = name[len(BACKBONE_PREFIX):]
        if k not in base:
            unexpected.append(name)
        elif tuple(v.shape) != tuple(base[k].shape):
            resized.append(f"{name} {tuple(v.shape)} -> {tuple(base[k].shape)}")
        else:
            loaded.append(name)
    loaded += report["loaded"]
    unexpected += report["unexpected"]
    mismatched, fresh = report["mismatched"], report["fresh"]
    logger.info("fine-tuning from the IRRA checkpoint %s: %d tensors loaded, %d resized, %d skipped, %d of this model "
                "not in the checkpoint", source, len(loaded), len(resized), len(mismatched) + len(unexpected),
                len(fresh))
    logger.info("  loaded (per module): %s", count_by_module(loaded))
    if resized:
        logger.info("  resized: %s", summarize_names(resized))
    if mismatched:
        logger.info("  skipped, other shape (the model's keep their initialisation): %s", summarize_names(mismatched))
    if unexpected:
        logger.info("  skipped, not in this model (per module): %s", count_by_module(unexpected))
    if fresh:
        logger.info("  not in the checkpoint (keep their initialisation): %s", summarize_names(fresh))


def build_model_from_checkpoint(args: argparse.Namespace, weights: Dict[str, torch.Tensor], source: str = "checkpoint",
                                config: str = "the config",
                                device: Optional[Union[str, torch.device]] = None) -> IRRA:
    """A trained IRRA rebuilt from its own weights (``utils.checkpoint.read_model_state_dict``): the backbone from
    ``base_model.*`` (no pretrained CLIP file needed), the number of identities from the classifier. The config's
    image grid is checked against the checkpoint's first (an error names ``config`` and ``source``). The model is
    returned on ``device`` (default ``args.device``) with the weights loaded."""
    kind = checkpoint_kind(weights)
    is_rde_config = rde_loss_name(parse_loss_names(args.loss_names, VALID_LOSSES + RDE_LOSSES)) is not None
    if (kind == "rde") != is_rde_config:
        raise ValueError(f"{source} is an {kind.upper()} checkpoint but {config} has --loss_names "
                         f"{args.loss_names!r} ({'an RDE' if is_rde_config else 'an IRRA'} model); use the config of "
                         f"the run that wrote it (an RDE loss such as tal builds RDE)")
    if kind == "rde":  # the TSE output width from the weights (RDE's checkpoints: 1024)
        fc = next(v for k, v in weights.items() if k.endswith("visul_emb_layer.fc.weight"))
        args.tse_embed_dim = int(fc.shape[0])
    clip_sd = clip_state_dict_from_checkpoint(weights)
    check_image_grid(clip_sd, args.img_size, args.stride_size, source=source, config=config)
    num_classes = checkpoint_num_classes(weights)  # None without an id head: num_classes is then unused
    device = torch.device(device) if device is not None else resolve_device(args.device)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = build_model(args, device=device, clip_state_dict=clip_sd, **kwargs)
    load_state_dict(model, weights, source=source)
    return model.to(device)
