"""CLIP fine-tuning with the symmetric ITC loss (``--method clip_itc``): ``method.py``, ``options.py``."""
