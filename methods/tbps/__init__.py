"""TBPS-CLIP (Cao et al., AAAI 2024, "An Empirical Study of CLIP for Text-based Person Search";
Flame-Chasers/TBPS-CLIP, commit ba090bc) as a method of this codebase."""
from methods.tbps.functions import cosine_scheduler, interpolate_text, pre_caption, resize_pos_embed, tokenize
from methods.tbps.losses import calc_contrastive, compute_simclr_loss
from methods.tbps.model import TBPS, TBPSArch, TBPSLossConfig

__all__ = ["TBPS", "TBPSArch", "TBPSLossConfig", "calc_contrastive", "compute_simclr_loss", "cosine_scheduler",
           "interpolate_text", "pre_caption", "resize_pos_embed", "tokenize"]
