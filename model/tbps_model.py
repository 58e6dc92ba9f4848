"""TBPS-CLIP's public names at TBPS's module path (``model/tbps_model.py``); the code lives in ``methods/tbps/``.
``CLIP`` is TBPS's class name for its model (here :class:`methods.tbps.model.TBPS`)."""
from methods.tbps.functions import cosine_scheduler, interpolate_text, pre_caption, resize_pos_embed, tokenize
from methods.tbps.losses import calc_contrastive, compute_simclr_loss
from methods.tbps.model import TBPS, TBPSArch, TBPSLossConfig

CLIP = TBPS

__all__ = ["CLIP", "TBPS", "TBPSArch", "TBPSLossConfig", "calc_contrastive", "compute_simclr_loss",
           "cosine_scheduler", "interpolate_text", "pre_caption", "resize_pos_embed", "tokenize"]
