from .processor import do_inference, do_train

__all__ = ["do_train", "do_inference"]
