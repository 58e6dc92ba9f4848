"""RDE (Qin et al., CVPR 2024, "Noisy-Correspondence Learning for Text-to-Image Person Re-identification") as a
method: the model (``methods/rde/model.py``; its TSE layers in ``model/CrossEmbeddingLayer_tse.py``, its losses in
``model/objectives.py``, RDE's own paths), CCD as its training hook (``methods/rde/ccd.py``), its options
(``methods/rde/options.py``), its parameter groups (the TSE layers at ``--tse_lr``), its feature sets ``bge``, ``tse``
and ``bge+tse`` (RDE's (S_bge + S_tse) / 2, the default) and its checkpoint format."""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import torch
from torch import nn

from methods.base import Method, TrainHook
from methods.irra.method import irra_param_groups
from methods.rde.ccd import CCDHook
from methods.rde.model import RDE, joint_features
from model.pretrained import BACKBONE_PREFIX

TSE_KEYS = ("visul_emb_layer", "texual_emb_layer")  # RDE's TSE layers (its attribute names)


class RDEMethod(Method):
    name = "rde"
    feature_sets = ("bge", "tse", "bge+tse")
    default_feature_set = "bge+tse"
    sample_index = True  # CCD's label_hat is looked up by the sample's index

    def build_model(self, args: argparse.Namespace, num_classes: int,
                    clip_state_dict: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
        return RDE(args, num_classes, clip_state_dict=clip_state_dict)

    def param_groups(self, args: argparse.Namespace, model: nn.Module) -> List[Dict]:
        """IRRA's rule, then the TSE layers (biases too) at ``--tse_lr`` (RDE's hard-coded 1e-3)."""
        return irra_param_groups(args, model, lr_of=lambda key, lr: args.tse_lr if any(k in key for k in TSE_KEYS)
                                 else lr)

    def train_hooks(self, args: argparse.Namespace) -> List[TrainHook]:
        return [CCDHook()]

    def encode_images(self, model: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self._sets(*model.encode_image_both(images))  # one backbone pass

    def encode_texts(self, model: nn.Module, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self._sets(*model.encode_text_both(text))

    @staticmethod
    def _sets(bge: torch.Tensor, tse: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"bge": bge, "tse": tse, "bge+tse": joint_features(bge, tse)}

    def checkpoint_match(self, state_dict: Dict[str, torch.Tensor]) -> int:
        """RDE's released checkpoints and ours: ``base_model.*`` and the TSE layers (more specific than IRRA's)."""
        keys = list(state_dict)
        return 2 * int(any(k.startswith(BACKBONE_PREFIX) for k in keys)
                       and any(k.startswith(TSE_KEYS) for k in keys))

    def args_for_checkpoint(self, args: argparse.Namespace, state_dict: Dict[str, torch.Tensor]
                            ) -> argparse.Namespace:
        """The TSE output width from the weights (RDE's released checkpoints: 1024)."""
        width = int(next(v for k, v in state_dict.items() if k.endswith("visul_emb_layer.fc.weight")).shape[0])
        return args.replace(tse_embed_dim=width) if width != args.tse_embed_dim else args


METHOD = RDEMethod()
