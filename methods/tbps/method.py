"""TBPS-CLIP as a method (``--method tbps``): its model (``methods/tbps/model.py``), parameter groups (AdamW, no decay
on 1-d weights / biases / norms, ``--lr_factor`` for cross / classifier / mlm_head), its per-iteration cosine schedule
and N-ITC's alpha ramp (a training hook), its training views (``methods/tbps/data.py``), its test-time preprocessing
(bicubic resize, ImageNet mean / std, ``pre_caption``) and its checkpoint format (``{"model": ...}`` with
``visual.*`` / ``encode_text.*`` keys)."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from methods.base import Method, TrainHook, TrainState
from methods.tbps import options as O
from methods.tbps.checkpoint import arch_from_state_dict, build_tbps, is_tbps_state_dict, load_tbps_weights
from methods.tbps.data import TBPSTrainDataset, eval_transform
from methods.tbps.functions import PRE_CAPTION_MAX_WORDS, cosine_scheduler, pre_caption
from methods.tbps.model import TBPS, TBPSLossConfig
from methods.tbps.safe_load import load_tbps_file
from utils.checkpoint import CheckpointReadError
from utils.choices import parse_loss_names
from utils.simple_tokenizer import get_tokenizer, tokenize

RANDOM_INIT_KEYS = ("cross", "classifier", "mlm_head")  # TBPS's ratio_factor parameters
NO_DECAY_KEYS = ("bias", "ln", "bn")  # TBPS's rule (with p.ndim < 2)


def loss_config(args: argparse.Namespace) -> TBPSLossConfig:
    """TBPS's experiment switches from ``--loss_names`` (``--simplified``: nitc+ritc) and the ratio options."""
    tasks = set(O.loss_set(args, parse_loss_names(args.loss_names, O.LOSSES)))
    return TBPSLossConfig(nitc_ratio=args.nitc_ratio, mvs_image="mvs" in tasks, ss="ss" in tasks,
                          ss_ratio=args.ss_ratio, simclr_temperature=args.simclr_temperature, citc="citc" in tasks,
                          citc_lambda1=args.citc_lambda1, citc_lambda2=args.citc_lambda2, citc_ratio=args.citc_ratio,
                          ritc="ritc" in tasks, ritc_eps=args.ritc_eps, ritc_ratio=args.ritc_ratio, id="id" in tasks,
                          id_ratio=args.id_loss_weight, local_negatives=args.local_negatives)


def tbps_param_groups(args: argparse.Namespace, model: nn.Module) -> List[Dict]:
    """TBPS's ``build_optimizer``: one group per trainable parameter; weight decay ``--weight_decay`` except for
    1-d parameters and names containing bias / ln / bn (0); lr ``--lr`` times ``--lr_factor`` for names containing
    cross / classifier / mlm_head. The per-iteration schedule scales every group's lr by the same factor."""
    groups = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen weights (visual.conv1)
        decay = 0.0 if p.ndim < 2 or any(k in name for k in NO_DECAY_KEYS) else args.weight_decay
        lr = args.lr * (args.lr_factor if any(k in name for k in RANDOM_INIT_KEYS) else 1.0)
        groups.append({"params": [p], "lr": lr, "weight_decay": decay})
    return groups


class PerIterationLR:
    """TBPS's schedule as the trainer's scheduler: the lrs are set per iteration by :class:`TBPSHook`, so the
    per-epoch ``step()`` does nothing; nothing to save (the hook recomputes the lr from the step count)."""

    def step(self) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class TBPSHook(TrainHook):
    """Before every step: each group's lr = ``cosine_scheduler(...)[global step]`` times its ratio to ``--lr``
    (TBPS's ``param_group['lr'] = lr_schedule[it] * param_group['ratio']``), and the batch's ``alpha`` =
    ``softlabel_ratio * min(1, iteration / iterations per epoch)`` in the first epoch, ``softlabel_ratio`` after."""

    def __init__(self) -> None:
        self.schedule: Sequence[float] = ()
        self.ratios: List[float] = []

    def before_train(self, state: TrainState) -> None:
        args = state.args
        self.schedule = cosine_scheduler(args.lr, args.target_lr, args.num_epoch, state.iters_per_epoch,
                                         args.warmup_epochs, args.lr * args.warmup_factor)
        self.ratios = [g["lr"] / args.lr for g in state.optimizer.param_groups]

    def set_lr(self, state: TrainState) -> None:
        lr = self.schedule[min(state.global_step, len(self.schedule) - 1)]
        for group, ratio in zip(state.optimizer.param_groups, self.ratios):
            group["lr"] = lr * ratio

    def before_epoch(self, state: TrainState) -> None:
        self.set_lr(state)  # the epoch's first lr is the one the trainer logs for the epoch

    def before_step(self, state: TrainState, batch: Dict[str, Any]) -> Dict[str, Any]:
        self.set_lr(state)
        ratio = state.args.softlabel_ratio
        batch["alpha"] = ratio * min(1.0, state.iteration / state.iters_per_epoch) if state.epoch == 1 else ratio
        return batch


class CaptionTokenizer:
    """TBPS's test-time caption -> ids [text_length]: ``pre_caption`` (77 words), then TBPS's ``tokenize``."""

    def __init__(self, text_length: int = 77) -> None:
        self.text_length = int(text_length)

    def __call__(self, caption: str) -> torch.Tensor:
        return tokenize(pre_caption(caption, PRE_CAPTION_MAX_WORDS), get_tokenizer(), self.text_length)


class TBPSMethod(Method):
    name = "tbps"
    reads_pretrain_file = True  # TBPS checkpoints, OpenAI CLIP files (methods/tbps/checkpoint.py:build_tbps)

    def build_model(self, args: argparse.Namespace, num_classes: int,
                    clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
        """From ``--pretrain_choice`` (a TBPS checkpoint, an OpenAI CLIP or ``scratch:<arch>``), or from TBPS weights
        ``clip_state_dict`` (a trained checkpoint rebuilt)."""
        losses = loss_config(args)
        classes = num_classes if losses.id else None
        if clip_state_dict is not None and is_tbps_state_dict(clip_state_dict):
            arch = arch_from_state_dict(clip_state_dict, args.img_size, args.head_width, args.text_length)
            arch.num_classes = classes or arch.num_classes
            model = TBPS(arch, losses, args.tbps_dropout)
            load_tbps_weights(model, clip_state_dict, source="checkpoint")
        else:
            model = build_tbps(args.pretrain_choice, args.img_size, losses, args.tbps_dropout, args.text_length,
                               args.head_width, tuple(args.simclr_mlp) if losses.ss else None, classes,
                               args.clip_download_root)
        model.set_fused_attention(args.fused_attention)
        return model

    def param_groups(self, args: argparse.Namespace, model: nn.Module) -> List[Dict]:
        return tbps_param_groups(args, model)

    def build_lr_scheduler(self, args: argparse.Namespace, optimizer: torch.optim.Optimizer, iters_per_epoch: int):
        return PerIterationLR()

    def train_hooks(self, args: argparse.Namespace) -> List[TrainHook]:
        return [TBPSHook()]

    def build_train_set(self, args: argparse.Namespace, rows: Sequence[tuple], transform: Callable, caption_aug,
                        captions_bt) -> Optional[torch.utils.data.Dataset]:
        """TBPS's views (``methods/tbps/data.py``); ``transform`` (the core's) is not used."""
        losses = loss_config(args)
        return TBPSTrainDataset(rows, args.img_size, text_length=args.text_length, seed=args.seed,
                                caption_aug=caption_aug, captions_bt=captions_bt, pool_ops=args.img_aug_pool_ops,
                                with_ss=losses.ss, with_aug1=losses.mvs_image,
                                check_files=not args.skip_image_check)

    def test_transform(self, args: argparse.Namespace) -> Callable:
        return eval_transform(args.img_size)

    def caption_tokenizer(self, args: argparse.Namespace) -> Optional[Callable[[str], torch.Tensor]]:
        return CaptionTokenizer(args.text_length)

    def checkpoint_match(self, state_dict: Dict[str, torch.Tensor]) -> int:
        """TBPS's layout: ``visual.proj`` and ``encode_text.text_projection``."""
        return 3 * int(is_tbps_state_dict(state_dict))

    def read_checkpoint(self, path: str) -> Dict[str, Any]:
        """Ours, and TBPS's training checkpoints (``{"model", "optimizer", "config": EasyDict}``, read through the
        whitelisting unpickler of ``methods/tbps/safe_load.py``)."""
        obj = load_tbps_file(path)
        if not isinstance(obj, dict):
            raise CheckpointReadError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
        return obj if isinstance(obj.get("model"), dict) else {"model": obj}

    def checkpoint_backbone(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """TBPS's weights as they are (its image tower's keys are CLIP's, ``visual.*``)."""
        return state_dict

    def args_for_checkpoint(self, args: argparse.Namespace, state_dict: Dict[str, torch.Tensor]
                            ) -> argparse.Namespace:
        """The heads the weights have: ``ss`` (and ``--simclr_mlp`` from its shapes) with ``simclr_mlp.*``, ``id``
        with ``classifier.*`` (so that the model holds every weight of the checkpoint); the rest as given."""
        tasks = list(parse_loss_names(args.loss_names, O.LOSSES))
        changes: Dict[str, Any] = {}
        if "simclr_mlp.0.weight" in state_dict:
            hidden, d_in = state_dict["simclr_mlp.0.weight"].shape
            changes["simclr_mlp"] = (int(d_in), int(hidden), int(state_dict["simclr_mlp.2.weight"].shape[0]))
            tasks += ["ss"] if "ss" not in tasks else []
        if "classifier.weight" in state_dict and "id" not in tasks:
            tasks.append("id")
        if args.simplified and set(tasks) != set(O.SIMPLIFIED_LOSSES.split("+")):
            changes["simplified"] = False
        changes["loss_names"] = "+".join(tasks)
        return args.replace(**changes)


METHOD = TBPSMethod()
