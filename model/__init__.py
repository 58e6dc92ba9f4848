"""The networks: CLIP (clip_model.py), IRRA (build.py, with the builder of every method's model), RDE's TSE layers
(CrossEmbeddingLayer_tse.py, RDE's path), the losses (objectives.py) and every weight-file read (pretrained.py). Each
method's own code is in its package under methods/."""
from .build import build_model, IRRA

__all__ = ["build_model", "IRRA"]
