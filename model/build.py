"""IRRA: CLIP backbone + SDM/ITC/CMPM/ID losses + implicit relation reasoning (cross-modal MLM).

Also how it is built from options and weights: ``build_model`` (``--pretrain_choice``, incl. fine-tuning from an IRRA
checkpoint, whose run directory's configs.yaml gives its image grid) and ``build_model_from_checkpoint``. Weight files
are read by model/pretrained.py.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from model import objectives
from model.clip_model import (LayerNorm, QuickGELU, ResidualAttentionBlock, Transformer,
                              build_CLIP_from_openai_pretrained, convert_weights, fused_multihead_attention,
                              init_transformer_)
from methods.registry import METHODS, get_method
from model.lengths import caption_cut, host_lengths, masked_first, mlm_lengths
from model.pretrain_report import load_pretrain_report
from model.pretrained import (ImagePositions, check_image_grid, checkpoint_num_classes,
                              image_grid, image_positions, is_pretrained_file,
                              load_pretrained_file, resize_image_pos_embed)
from utils.choices import PRECISIONS
from methods.irra.options import LOSSES
from utils.choices import parse_loss_names
from utils.checkpoint import load_state_dict, strip_prefix_if_present
from utils.comm import all_reduce_sum, gather_with_grad, get_world_size, resolve_device, scale_grad
from utils.options import load_config_args
from utils.run_dir import CONFIG_FILE

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
    The lengths of (a) and (b) are read from the batch's tensors (a device-to-host copy) unless the batch carries
    them as Python ints (:meth:`host_lengths`, which the trainer computes before the batch goes to the device: the
    training step then has no host sync). ``--length_bucket N`` rounds them up to multiples of N and pads (a)'s
    masked-token count to a few sizes (:func:`mlm_token_bucket`): the shapes take few values; the losses agree to
    float rounding (exact in exact arithmetic, not bitwise: the reductions run over more, zero-weight, positions).

    Under DDP (world size > 1, unless ``args.local_negatives``) every loss is over the global batch: image/text
    features and pids are gathered from all ranks for SDM/ITC/CMPM, and the MLM loss and accuracy are means over
    all masked tokens of the global batch. Gradients are scaled so that DDP's averaging gives exactly the gradient of
    one process on the whole batch; the returned values are the global ones on every rank.

    Options read once from ``args``: loss_names, temperature, id_loss_weight, mlm_loss_weight, cmt_depth,
    vocab_size, text_length, img_size, stride_size, pretrain_choice, clip_download_root, local_negatives,
    length_bucket.
    """

    def __init__(self, args: argparse.Namespace, num_classes: int,
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
        self.length_bucket = int(args.length_bucket)
        if self.length_bucket < 1:
            raise ValueError(f"--length_bucket {self.length_bucket}: expected an integer >= 1")
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
        self.set_fused_attention(args.fused_attention)

    def _set_task(self, loss_names: str) -> None:
        self.current_task = parse_loss_names(loss_names, LOSSES)
        logger.info("Training Model with %s tasks", self.current_task)

    def cross_former(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     query_len: Optional[int] = None) -> torch.Tensor:
        """Text tokens q [B, L, D] attend to image tokens k/v [B, P, D], then cmt_depth self-attention blocks.

        ``query_len``: only the first ``query_len`` output positions are needed; the last block then computes
        its queries/MLP for those positions only (keys/values still cover all L positions, so the kept outputs
        are unchanged). Returns [B, L, D] (or [B, query_len, D]). The blocks are checkpointed when
        ``set_grad_checkpointing`` turned it on (the fast path's last block included).
        """
        if self.fused_attention:
            x = fused_multihead_attention(self.cross_attn, self.ln_pre_t(q), self.ln_pre_i(k), self.ln_pre_i(v))
        else:
            x = self.cross_attn(self.ln_pre_t(q), self.ln_pre_i(k), self.ln_pre_i(v), need_weights=False)[0]
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.cross_modal_transformer(x, query_len=query_len)  # [L or query_len, B, D]
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_post(x)
        return x

    def set_fused_attention(self, enable: bool = True) -> None:
        """Attention by ``F.scaled_dot_product_attention`` (fused kernels) in every block of the image, text and
        cross-modal transformers and in ``cross_attn`` (``--fused_attention``), or by ``nn.MultiheadAttention``'s
        forward. Same parameters and state dict; the numbers agree within float rounding (another summation order
        on some devices; bitwise on the CPU, see README)."""
        self.fused_attention = bool(enable)
        for m in self.modules():
            if isinstance(m, ResidualAttentionBlock):
                m.fused = self.fused_attention

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

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] float (CLS token for ViT, attention-pooled token for ResNet)."""
        x = self.base_model.encode_image(image)
        return x[:, 0, :].float()

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, D] float (features at the EOT token)."""
        if self.fast:
            text = text[:, :caption_cut(text, self.length_bucket)]  # one host sync per call (evaluation; the trainer passes the cut)
        x = self.base_model.encode_text(text)
        return x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)].float()

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """batch: images [B,3,H,W], caption_ids [B,L], pids [B] (+ mlm_ids, mlm_labels [B,L] for mlm); optionally the
        host-side lengths of :func:`host_lengths` (Python ints; without them the fast path reads them from the
        tensors, a device-to-host copy each)."""
        ret: Dict[str, torch.Tensor] = {"temperature": 1 / self.logit_scale}
        image_feats, i_feats, t_feats = self.global_features(batch)
        world = 1 if self.local_negatives else get_world_size()
        ret.update(self.contrastive_losses(*self.gather_for_losses(i_feats, t_feats, batch["pids"], world), world))
        if "id" in self.current_task:
            ret.update(self.id_losses(i_feats, t_feats, batch["pids"]))
        if "mlm" in self.current_task:
            ret.update(self.mlm_losses(*self.mlm_scores(batch, image_feats), world))
        return ret

    def global_features(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The CLIP pass over images and captions: (image tokens [B, 1+P, D], image features [B, D] float,
        text features at the EOT token [B, D] float). The fast path cuts the captions first (exact: see the class)."""
        caption_ids = batch["caption_ids"]
        if self.fast:
            cut = batch.get("caption_cut")
            caption_ids = caption_ids[:, :(caption_cut(caption_ids, self.length_bucket) if cut is None else cut)]
        image_feats, text_feats = self.base_model(batch["images"], caption_ids)  # [B, 1+P, D], [B, L, D]
        i_feats = image_feats[:, 0, :].float()
        rows = torch.arange(text_feats.shape[0], device=text_feats.device)
        t_feats = text_feats[rows, caption_ids.argmax(dim=-1)].float()
        return image_feats, i_feats, t_feats

    def host_lengths(self, batch: Dict[str, torch.Tensor]) -> Dict[str, int]:
        """:func:`host_lengths` of the batch (on the host) with this model's ``--length_bucket``."""
        return host_lengths(batch, self.length_bucket)

    def gather_for_losses(self, i_feats: torch.Tensor, t_feats: torch.Tensor, pids: torch.Tensor,
                          world: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the contrastive losses need: under DDP (``world`` > 1) the image/text features and pids of every
        rank, [b, D] per rank -> [world * b, D] (gradients through this rank's slice: see the class docstring);
        otherwise the inputs themselves."""
        if world > 1 and {"itc", "sdm", "cmpm"} & set(self.current_task):
            return gather_with_grad(i_feats), gather_with_grad(t_feats), gather_with_grad(pids)
        return i_feats, t_feats, pids

    def contrastive_losses(self, all_i: torch.Tensor, all_t: torch.Tensor, all_pids: torch.Tensor,
                           world: int) -> Dict[str, torch.Tensor]:
        """ITC / SDM / CMPM (those in the task) over the (gathered) features, gradients scaled by ``world``."""
        ret: Dict[str, torch.Tensor] = {}
        logit_scale = self.logit_scale
        if "itc" in self.current_task:
            ret["itc_loss"] = scale_grad(objectives.compute_itc(all_i, all_t, logit_scale), world)
        if "sdm" in self.current_task:
            ret["sdm_loss"] = scale_grad(objectives.compute_sdm(all_i, all_t, all_pids, logit_scale), world)
        if "cmpm" in self.current_task:
            ret["cmpm_loss"] = scale_grad(objectives.compute_cmpm(all_i, all_t, all_pids), world)
        return ret

    def id_losses(self, i_feats: torch.Tensor, t_feats: torch.Tensor, pids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Identity classification of both modalities (this rank's samples): id_loss, img_acc, txt_acc."""
        wdtype = self.classifier.weight.dtype  # the original casts with .half() (its weights are always fp16)
        image_logits = self.classifier(i_feats.to(wdtype)).float()
        text_logits = self.classifier(t_feats.to(wdtype)).float()
        id_loss = objectives.compute_id(image_logits, text_logits, pids) * self.id_loss_weight
        image_pred = torch.argmax(image_logits, dim=1)
        text_pred = torch.argmax(text_logits, dim=1)
        return {"id_loss": id_loss, "img_acc": (image_pred == pids).float().mean(),
                "txt_acc": (text_pred == pids).float().mean()}

    def mlm_scores(self, batch: Dict[str, torch.Tensor], image_feats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Implicit relation reasoning: the masked captions attend to the image tokens (cross_former), the MLM head
        predicts the vocabulary. Returns (scores [T, V] float, labels [T], 0 = ignored).

        The original computation (``fast`` False): every position, T = B * L. The fast path: only the first
        ``mlm_query_len`` positions are queries of the last block, and the head runs on ``mlm_tokens`` positions:
        the masked ones in row-major order, then (``--length_bucket`` > 1) unmasked ones (label 0, ignored) up to a
        bucket size (:func:`mlm_token_bucket`). No device-to-host copy when the batch carries :meth:`host_lengths`."""
        if "mlm_ids" not in batch or "mlm_labels" not in batch:
            raise KeyError("loss 'mlm' needs batch['mlm_ids'] and batch['mlm_labels'] (build the data with --MLM)")
        mlm_ids, labels = batch["mlm_ids"], batch["mlm_labels"]  # [B, L] each, full length: see the class docstring
        mlm_feats = self.base_model.encode_text(mlm_ids)  # [B, L, D]
        if not self.fast:
            x = self.cross_former(mlm_feats, image_feats, image_feats)  # [B, L, D]
            x = self.mlm_head(x)  # [B, L, vocab]
            return x.float().reshape(-1, self.vocab_size), labels.reshape(-1)  # [B*L, vocab], [B*L]
        if "mlm_query_len" not in batch or "mlm_tokens" not in batch:
            lengths = mlm_lengths(labels, self.length_bucket)  # a device-to-host copy
        else:
            lengths = {"mlm_query_len": batch["mlm_query_len"], "mlm_tokens": batch["mlm_tokens"]}
        query_len = lengths["mlm_query_len"]
        x = self.cross_former(mlm_feats, image_feats, image_feats, query_len=query_len)  # [B, query_len, D]
        index = masked_first(labels[:, :query_len], lengths["mlm_tokens"])  # [T] flat positions in [B, query_len]
        rows, cols = index // query_len, index % query_len
        return self.mlm_head(x[rows, cols]).float(), labels[rows, cols]  # [T, D] -> [T, vocab]; [T]

    def mlm_losses(self, scores: torch.Tensor, labels: torch.Tensor, world: int) -> Dict[str, torch.Tensor]:
        """mlm_loss (times ``mlm_loss_weight``) and mlm_acc over the masked tokens (labels != 0); under DDP over those
        of the global batch (:meth:`_global_mlm`)."""
        if world > 1:
            mlm_loss, acc = self._global_mlm(scores, labels, world)
        else:
            mlm_loss = objectives.compute_mlm(scores, labels)
            masked = labels != 0
            # the mean of pred == label over the masked tokens, without a data-dependent shape (no host sync)
            acc = ((scores.argmax(dim=1) == labels) & masked).sum().float() / masked.sum().float()
        return {"mlm_loss": mlm_loss * self.mlm_loss_weight, "mlm_acc": acc}

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


def build_model(args: argparse.Namespace, num_classes: int, device: Optional[Union[str, torch.device]] = None,
                clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
    """Build the model of ``args.method`` (``methods/registry.py``; IRRA by default) on the CPU and apply the precision
    rule for the target ``device``. ``num_classes``: the identities of the training set (IRRA's id head).

    ``args.pretrain_choice`` may be a trained checkpoint (the original IRRA's ``best.pth``, ours, any method's with a
    ``module.`` prefix or a bare state dict; recognised by its ``base_model.*`` keys) to fine-tune from: the backbone
    is built from its ``base_model.*`` weights (architecture read from them, positional embeddings resized to
    ``img_size`` / ``text_length`` as for a CLIP file), then every other tensor whose name and shape match is loaded;
    the others (e.g. a classifier for another number of identities) keep their initialisation. The log lists what
    was loaded, resized and skipped.

    ``args.precision``: fp16 -> convert_weights (OpenAI fp16 weights); auto -> fp16 when the target device
    (``device`` or ``args.device``) is the accelerator, fp32 otherwise; fp32 / amp_bf16 / amp_fp16 -> fp32
    weights (the trainer autocasts for amp_*). ``args.grad_checkpointing``: the model's ``set_grad_checkpointing``
    (activation checkpointing of the blocks). ``clip_state_dict``: see :class:`IRRA` (``pretrain_choice`` is then
    not read).
    """
    precision = args.precision
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    device = torch.device(device) if device is not None else resolve_device(args.device)
    irra_state_dict = None
    method = get_method(args.method)
    if clip_state_dict is None and is_pretrained_file(args.pretrain_choice) and not method.reads_pretrain_file:
        clip_state_dict, irra_state_dict = _read_pretrain_file(args)  # the file is read once
    try:
        model = method.build_model(args, num_classes, clip_state_dict=clip_state_dict)
    except ValueError as e:  # the backbone built from the file's weights cannot take them all (CLIP.load_param)
        if irra_state_dict is None or not str(e).startswith("CLIP"):
            raise
        raise ValueError(f"--pretrain_choice {args.pretrain_choice}: the checkpoint's backbone does not match: {e}") \
            from None
    if irra_state_dict is not None:  # the backbone was built from its base_model.*: check it, load the rest, report
        load_pretrain_report(model, irra_state_dict, args.pretrain_choice)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if precision == "fp16" or (precision == "auto" and device.type != "cpu"):
        convert_weights(model)
        logger.info("model weights converted to fp16 (precision=%s, device=%s)", precision, device)
    return model


def checkpoint_methods(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """The methods whose checkpoint format ``state_dict`` is (keys with or without ``module.``): those that recognise
    it most specifically (``Method.checkpoint_match``; several when the formats coincide, e.g. a backbone-only
    state dict). A ValueError names the first keys when none does."""
    keys = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    scores = {name: get_method(name).checkpoint_match(keys) for name in METHODS}
    best = max(scores.values())
    if best <= 0:
        raise ValueError(f"unrecognised model state dict (no method of {list(METHODS)} knows its format); first keys: "
                         f"{list(keys)[:3]}")
    return [name for name, score in scores.items() if score == best]


def _read_pretrain_file(args: argparse.Namespace
                        ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """``(clip_state_dict, irra_state_dict)`` of the ``--pretrain_choice`` file (see
    :func:`model.pretrained.load_pretrained_file`). An IRRA checkpoint's image positional embedding is resized to
    ``img_size`` / ``stride_size`` from the grid it was trained on (it may be non-square): the one given by the
    configs.yaml next to it (:func:`trained_image_grid`), else inferred."""
    path = args.pretrain_choice
    clip_sd, irra_sd = load_pretrained_file(path)
    pos = image_positions(clip_sd)
    if irra_sd is not None and pos is not None:
        ny, nx = image_grid(args.img_size, pos.patch_size, args.stride_size)
        if pos.count != ny * nx:
            old_grid = trained_image_grid(path, pos)
            clip_sd = resize_image_pos_embed(clip_sd, args.img_size, args.stride_size, old_grid=old_grid, source=path)
    return clip_sd, irra_sd


def trained_image_grid(path: str, pos: ImagePositions) -> Optional[Tuple[int, int]]:
    """The (rows, cols) image grid that checkpoint ``path`` was trained on, from the img_size / stride_size of the
    configs.yaml next to it (written by our runs and the original's) when that grid has the checkpoint's
    ``pos.count`` positions; None (with a warning when the file is there but does not fit) otherwise."""
    cfg_file = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        return None
    try:
        cfg = vars(load_config_args(cfg_file))
        grid = image_grid(cfg["img_size"], pos.patch_size, cfg["stride_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s: cannot read img_size / stride_size (%s): the image grid of %s is inferred",
                       cfg_file, e, path)
        return None
    if grid[0] * grid[1] == pos.count:
        logger.info("%s: image positional grid %dx%d (img_size %s in %s)", path, grid[0], grid[1],
                    tuple(cfg["img_size"]), cfg_file)
        return grid
    logger.warning("%s: img_size %s gives a %dx%d grid but the checkpoint has %d image positions: ignored",
                   cfg_file, tuple(cfg["img_size"]), grid[0], grid[1], pos.count)
    return None


def build_model_from_checkpoint(args: argparse.Namespace, weights: Dict[str, torch.Tensor], source: str = "checkpoint",
                                config: str = "the config",
                                device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """A trained model rebuilt from its own weights (``utils.checkpoint.read_model_state_dict``): the backbone from
    ``base_model.*`` (no pretrained CLIP file needed), the number of identities from the classifier, the method's
    widths from the weights (``Method.args_for_checkpoint``). The checkpoint's method must be the config's, and the
    config's image grid must fit the checkpoint's (errors name ``config`` and ``source``). The model is returned on
    ``device`` (default ``args.device``) with the weights loaded."""
    kinds = checkpoint_methods(weights)
    if args.method not in kinds:
        raise ValueError(f"{source} is a checkpoint of --method {' / '.join(kinds)} but {config} has --method "
                         f"{args.method} (--loss_names {args.loss_names!r}); use the config of the run that wrote it")
    method = get_method(args.method)
    args = method.args_for_checkpoint(args, weights)
    clip_sd = method.checkpoint_backbone(strip_prefix_if_present(weights, "module."))
    check_image_grid(clip_sd, args.img_size, args.stride_size, source=source, config=config)
    num_classes = checkpoint_num_classes(weights)  # None without an id head: the model then has none
    device = torch.device(device) if device is not None else resolve_device(args.device)
    model = build_model(args, num_classes, device=device, clip_state_dict=clip_sd)
    load_state_dict(model, weights, source=source)
    return model.to(device)


def __getattr__(name: str):
    """RDE's class where RDE's own code has it (its ``model/build.py:RDE``), from its package ``methods/rde``
    (imported on first use: ``methods.rde`` imports this module's package)."""
    if name == "RDE":
        from methods.rde.model import RDE
        return RDE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
