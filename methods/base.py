"""The method interface: what the core (trainer, setup, evaluator, solver, data pipeline, search package, test.py,
visualize.py) calls, so that it names no method.

A method is a :class:`Method` (its package's ``METHOD``, found by ``methods/registry.py``) and an ``options`` module
(its option group). The core asks the method, never the other way round:

=========================  ===========================================  ==========================================
hook                       called by                                    default (IRRA's behaviour)
=========================  ===========================================  ==========================================
``build_model``            ``model.build.build_model``                  (abstract)
``param_groups``           ``solver.build_optimizer``                   one group per parameter at lr / weight_decay
``build_lr_scheduler``     ``processor.setup``                          ``solver.build_lr_scheduler`` (per epoch)
``train_hooks``            ``processor.processor.do_train``             none
``sample_index``           ``datasets.build.build_train_loader``        False (batches carry no ``index``)
``build_train_set``        ``datasets.build.build_train_loader``        None: the core's ImageText(MLM)Dataset
``encode_images/_texts``   Evaluator, Retriever, page, visualize.py     ``{"global": model.encode_image(x)}``
``feature_sets``           the same (the names, and the one ranked)     ``("global",)``, ``default_feature_set``
``checkpoint_match``       ``model.build.detect_checkpoint_method``     0 (not recognised)
``args_for_checkpoint``    ``model.build.build_model_from_checkpoint``  the args unchanged
``test_transform``         ``datasets.build`` eval loaders, Retriever   resize + CLIP mean / std
``caption_tokenizer``      ``datasets.build`` eval loaders, Retriever   None: the core's CLIP tokenization
=========================  ===========================================  ==========================================

Training hooks follow detectron2's ``HookBase``: :class:`TrainHook` objects whose methods the trainer calls at
fixed points with the one :class:`TrainState` of the run.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


@dataclass
class TrainState:
    """What a training hook may read (and, for ``train_mode``, set): the run's parts and where the loop is.

    ``epoch`` is 1-based (as the trainer's), ``iteration`` the 0-based batch index within the epoch, ``global_step``
    the 0-based count of batches since the start of training (epoch 1, iteration 0 is step 0; a resumed run continues
    the count). ``train_mode`` is the mode the model trains in this epoch (``model.train(train_mode)``)."""

    args: argparse.Namespace
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    output_dir: str
    start_epoch: int = 1
    epoch: int = 0
    iteration: int = 0
    iters_per_epoch: int = 0
    train_mode: bool = True
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def global_step(self) -> int:
        return (self.epoch - 1) * self.iters_per_epoch + self.iteration


class TrainHook:
    """A method's part in the training loop (detectron2's ``HookBase``). Every method is a no-op by default."""

    def before_train(self, state: TrainState) -> None:
        """Once, before the first epoch of this process (a resumed run included: ``state.start_epoch``)."""

    def before_epoch(self, state: TrainState) -> None:
        """Before each epoch's first batch (the epoch's seeds are set; ``state.epoch`` is the epoch)."""

    def before_step(self, state: TrainState, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Each batch on the device, before the step: returns the batch the model gets (add keys, not copies)."""
        return batch

    def after_step(self, state: TrainState, outputs: Dict[str, torch.Tensor]) -> None:
        """After each optimizer step, with the model's outputs."""

    def after_epoch(self, state: TrainState) -> None:
        """After each epoch's scheduler step, before its evaluation."""


class Method:
    """A text-to-image person retrieval method: override the hooks that differ from the defaults (see the module
    docstring). Subclasses set ``name`` (the registry's key) and, with more than one feature set, ``feature_sets``
    and ``default_feature_set``."""

    name: str = ""
    feature_sets: Tuple[str, ...] = ("global",)
    default_feature_set: str = "global"
    sample_index: bool = False

    # ----- model -----
    def build_model(self, args: argparse.Namespace, num_classes: int,
                    clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
        """The method's model (fp32, on the CPU), built from ``args`` (``clip_state_dict``: the backbone's weights
        instead of ``args.pretrain_choice``). ``num_classes``: identities of the training set."""
        raise NotImplementedError(f"method {self.name!r} has no build_model")

    # ----- optimisation -----
    def param_groups(self, args: argparse.Namespace, model: nn.Module) -> List[Dict]:
        """One group per trainable parameter, ``{"params": [p], "lr": ..., "weight_decay": ...}``, in the model's
        order (``solver.merge_param_groups`` joins equal ones). The method decides which parameter gets what."""
        return [{"params": [p], "lr": args.lr, "weight_decay": args.weight_decay}
                for _, p in model.named_parameters() if p.requires_grad]

    def build_lr_scheduler(self, args: argparse.Namespace, optimizer: torch.optim.Optimizer, iters_per_epoch: int):
        """The lr scheduler; the trainer calls its ``step()`` once after every epoch. A per-iteration schedule sets
        the lr in a training hook's ``before_step`` (``state.global_step``)."""
        from solver import build_lr_scheduler

        return build_lr_scheduler(args, optimizer)

    def train_hooks(self, args: argparse.Namespace) -> List[TrainHook]:
        """The hooks of one training run (fresh objects per run)."""
        return []

    def build_train_set(self, args: argparse.Namespace, rows: Sequence[tuple], transform: Callable, caption_aug,
                        captions_bt) -> Optional[torch.utils.data.Dataset]:
        """The training set over ``rows`` ``(pid, image_id, img_path, caption)`` (noise already injected), or None
        for the core's ``ImageTextDataset`` / ``ImageTextMLMDataset`` (``--MLM``)."""
        return None

    # ----- retrieval -----
    def encode_images(self, model: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images [B, 3, H, W] -> {feature set: [B, D] float}; every set in ``feature_sets`` is ranked by cosine."""
        return {"global": model.encode_image(images).float()}

    def encode_texts(self, model: nn.Module, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        """caption ids [B, L] -> {feature set: [B, D] float}, the same sets as :meth:`encode_images`."""
        return {"global": model.encode_text(text).float()}

    def check_feature_set(self, name: Optional[str]) -> str:
        """``name`` (None: the default) if this method has it, else a ValueError listing the valid ones."""
        name = self.default_feature_set if name is None else name
        if name not in self.feature_sets:
            raise ValueError(f"--feature_set {name!r}: method {self.name!r} has {list(self.feature_sets)}")
        return name

    def test_transform(self, args: argparse.Namespace) -> Callable:
        """The test-time image pipeline (a PIL image -> [3, H, W])."""
        from datasets.build import build_transforms

        return build_transforms(img_size=args.img_size, is_train=False)

    def caption_tokenizer(self, args: argparse.Namespace) -> Optional[Callable[[str], torch.Tensor]]:
        """The test-time caption -> ids [text_length] function, or None for the core's CLIP tokenization."""
        return None

    # ----- checkpoints -----
    def checkpoint_match(self, state_dict: Dict[str, torch.Tensor]) -> int:
        """How specifically this method recognises a model state dict (keys without ``module.``): 0 = not its
        format; among the methods that recognise it, the highest number wins."""
        return 0

    def args_for_checkpoint(self, args: argparse.Namespace, state_dict: Dict[str, torch.Tensor]
                            ) -> argparse.Namespace:
        """The options a model for ``state_dict`` is built with (e.g. widths read from the weights): a new frozen
        Namespace (``args.replace(...)``) or ``args``."""
        return args


def unwrap(model: nn.Module) -> nn.Module:
    """The model a DDP wrapper holds (the model itself otherwise)."""
    return getattr(model, "module", model)
