"""Training and inference: the run's setup (setup.py), the training loop and its step (processor.py), RDE's
Consensus Clean Division (ccd.py)."""
from .processor import do_inference, do_train

__all__ = ["do_train", "do_inference"]
