"""The valid names of every option that picks from a list (a leaf module: it imports nothing of the project).

The builders own the implementations and check at import that their registries match these tables
(``datasets.build.DATASET_REGISTRY``, ``solver``'s optimizers and schedules), so ``utils/options.py`` can validate a
whole run before anything heavy is imported.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence

PRECISIONS = ("auto", "fp32", "fp16", "amp_bf16", "amp_fp16")
DATASETS = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "SynthPEDES", "UFine6926")
# Metrics reported besides R@k / mAP / mINP when asked (--metrics); mSD reports its two variants (utils/msd.py).
EXTRA_METRICS = ("mSD",)
# Extra metrics a benchmark always reports (its paper's protocol): UFineBench's mSD on UFine6926.
DATASET_METRICS = {"UFine6926": ("mSD",)}
SAMPLERS = ("identity", "random")
VAL_DATASETS = ("test", "val")
OPTIMIZERS = ("SGD", "Adam", "AdamW")
LR_SCHEDULERS = ("step", "exp", "poly", "cosine", "linear")
WARMUP_METHODS = ("constant", "linear")
# The ops of --img_aug_pool (datasets/augment.py:image_pool_ops builds them in this order).
IMG_AUG_POOL = ("resized_crop", "erasing", "grayscale", "color_jitter", "flip", "rotation")


def check_choice(option: str, value: object, valid: Iterable[str]) -> None:
    """Raise ``ValueError('--option value: unknown; valid: [...]')`` unless ``value`` is one of ``valid``."""
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"--{option} {value!r}: unknown; valid: {list(valid)}")


def eval_metrics(metrics: Iterable[str], dataset_name: str) -> tuple:
    """The extra metrics an evaluation reports: ``--metrics`` plus the dataset's own (:data:`DATASET_METRICS`)."""
    return tuple(dict.fromkeys((*metrics, *DATASET_METRICS.get(dataset_name, ()))))


def parse_loss_names(loss_names: str, valid: Sequence[str]) -> List[str]:
    """``'sdm+id+mlm'`` -> ``['sdm', 'id', 'mlm']``; unknown or no names raise a ValueError listing the valid ones."""
    names = [n.strip() for n in str(loss_names).split("+") if n.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise ValueError(f"--loss_names {loss_names!r}: unknown loss(es) {bad}; valid names are {list(valid)} "
                         f"joined with '+', e.g. sdm+mlm+id (a method's losses: methods/<name>/options.py)")
    return names
