from .build import build_model, IRRA, VALID_LOSSES

__all__ = ["build_model", "IRRA", "VALID_LOSSES"]
