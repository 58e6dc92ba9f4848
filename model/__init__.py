"""The networks: CLIP (clip_model.py), IRRA (build.py), RDE (rde.py, CrossEmbeddingLayer_tse.py), the losses
(objectives.py) and every weight-file read (pretrained.py)."""
from .build import build_model, IRRA, VALID_LOSSES

__all__ = ["build_model", "IRRA", "VALID_LOSSES"]
