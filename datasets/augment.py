"""Augmentations from IRRA's successors (TBPS-CLIP, Cao et al., AAAI 2024), off by default.

Text (:class:`CaptionAugment`, applied to the caption string before tokenization):
- back-translation: with probability ``backtrans_prob`` the caption is replaced by its back-translation (the
  annotation entry's ``captions_bt[j]`` for ``captions[j]``; a caption without one stays as it is);
- random word deletion (EDA's random deletion, the only EDA operation that helped in TBPS-CLIP): with probability
  ``word_drop_apply_prob`` the caption's whitespace-separated words are each dropped with probability
  ``word_drop_rate``; if every word was dropped, one of them (drawn at random) is kept.
Back-translation is decided first, deletion then applies to the chosen caption (TBPS-CLIP's order). Every draw comes
from the ``random.Random`` passed in (the dataset seeds it per sample and epoch): a caption's coins are, in order,
the back-translation coin, the deletion coin, then one draw per word when deletion is applied (and one more to pick
the kept word if all were dropped).

Image (:class:`RandomOpsPool` inside :func:`image_pool_ops`' pipeline of ``datasets.build.build_transforms``): each
sample gets ``n_ops`` distinct operations drawn from a pool of six, applied in the drawn order to the resized image
as a [0, 1] tensor (after ToTensor, before Normalize, as TBPS-CLIP). The ops and their parameters are TBPS-CLIP's
(``misc/data.py``):

=============  ==========================================================================
resized_crop   ``RandomResizedCrop(img_size, scale=(0.9, 1.0))`` (aspect ratio 3/4..4/3)
erasing        ``RandomErasing(p=0.5, scale=(0.10, 0.20))``, filled with 0 (black)
grayscale      ``RandomGrayscale(p=0.1)``
color_jitter   ``ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0)``
flip           ``RandomHorizontalFlip(p=0.5)``
rotation       ``RandomRotation(15)`` (degrees, corners filled with 0)
=============  ==========================================================================

Two differences from TBPS-CLIP's ``Choose``: the ops are drawn without replacement (``torch.randperm``; TBPS-CLIP's
``np.random.choice(ops, 2)`` draws the same op twice for 1 sample in 6), and every draw (which ops, then each op's own
parameters) comes from torch's default generator, which the dataset seeds per sample (``datasets/bases.py``).
"""
from __future__ import annotations

import random
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torchvision.transforms as T

from utils.choices import IMG_AUG_POOL

# TBPS-CLIP's pool parameters (misc/data.py: build_pedes_data).
POOL_CROP_SCALE = (0.9, 1.0)
POOL_ERASING_P = 0.5
POOL_ERASING_SCALE = (0.10, 0.20)
POOL_GRAYSCALE_P = 0.1
POOL_JITTER = (0.1, 0.1, 0.1, 0.0)  # brightness, contrast, saturation, hue
POOL_FLIP_P = 0.5
POOL_ROTATION_DEGREES = 15.0


def image_pool_ops(img_size: Sequence[int]) -> List[Tuple[str, Callable]]:
    """The pool ``[(name, op)]`` in :data:`utils.choices.IMG_AUG_POOL` order; ops take and return a [3, H, W] tensor.

    Args:
        img_size: ``(H, W)`` of the run (the resized crop's output size).
    """
    height, width = img_size
    ops = {
        "resized_crop": T.RandomResizedCrop((height, width), scale=POOL_CROP_SCALE),
        "erasing": T.RandomErasing(p=POOL_ERASING_P, scale=POOL_ERASING_SCALE),
        "grayscale": T.RandomGrayscale(p=POOL_GRAYSCALE_P),
        "color_jitter": T.ColorJitter(*POOL_JITTER),
        "flip": T.RandomHorizontalFlip(p=POOL_FLIP_P),
        "rotation": T.RandomRotation(POOL_ROTATION_DEGREES),
    }
    assert tuple(ops) == IMG_AUG_POOL, "utils/choices.py:IMG_AUG_POOL must list the pool"
    return list(ops.items())


def pick_ops(n_pool: int, n_ops: int, generator: Optional[torch.Generator] = None) -> List[int]:
    """``n_ops`` distinct indices into a pool of ``n_pool`` ops, in a random order (``torch.randperm`` from
    ``generator``; default: torch's default CPU generator, which the dataset seeds per sample)."""
    if not 1 <= n_ops <= n_pool:
        raise ValueError(f"n_ops must be in [1, {n_pool}] (the pool's size), got {n_ops}")
    return torch.randperm(n_pool, generator=generator)[:n_ops].tolist()


class RandomOpsPool:
    """Apply ``n_ops`` distinct ops drawn from ``ops`` (see :func:`pick_ops`), in the drawn order.

    Args:
        ops: ``[(name, op)]``, e.g. :func:`image_pool_ops`.
        n_ops: how many ops each call applies (1 .. len(ops)).
        on_pick: optional hook called with the names of the ops picked for each call (for tests and debugging).
    """

    def __init__(self, ops: Sequence[Tuple[str, Callable]], n_ops: int = 2,
                 on_pick: Optional[Callable[[List[str]], None]] = None) -> None:
        if not 1 <= n_ops <= len(ops):
            raise ValueError(f"--img_aug_pool_ops {n_ops}: expected 1..{len(ops)} (the pool: "
                             f"{[name for name, _ in ops]})")
        self.ops = list(ops)
        self.n_ops = n_ops
        self.on_pick = on_pick

    def __call__(self, x):
        picked = [self.ops[i] for i in pick_ops(len(self.ops), self.n_ops)]
        if self.on_pick is not None:
            self.on_pick([name for name, _ in picked])
        for _, op in picked:
            x = op(x)
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_ops={self.n_ops}, ops={[name for name, _ in self.ops]})"


def drop_words(caption: str, rate: float, rng: random.Random) -> str:
    """EDA's random deletion: each whitespace-separated word is dropped with probability ``rate`` (one
    ``rng.random()`` per word); if none is left, one word drawn with ``rng`` is kept. Unchanged captions are returned
    as they are; changed ones are the kept words joined by single spaces."""
    words = caption.split()
    kept = [w for w in words if rng.random() >= rate]
    if len(kept) == len(words):
        return caption
    if not kept:
        kept = [rng.choice(words)]
    return " ".join(kept)


class CaptionAugment:
    """TBPS-CLIP's caption augmentation: back-translation, then random word deletion (module docstring).

    Args:
        word_drop_rate: each word's deletion probability (TBPS-CLIP's ``eda_alpha``, 0.05); 0 turns deletion off.
        word_drop_apply_prob: probability that deletion is applied to a caption (TBPS-CLIP: every caption, 1.0).
        backtrans_prob: probability that a caption with a back-translation is replaced by it (TBPS-CLIP: 0.1).
    """

    def __init__(self, word_drop_rate: float = 0.0, word_drop_apply_prob: float = 1.0,
                 backtrans_prob: float = 0.0) -> None:
        for name, p in (("txt_aug_word_drop_rate", word_drop_rate),
                        ("txt_aug_word_drop_apply_prob", word_drop_apply_prob),
                        ("txt_aug_backtrans_prob", backtrans_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"--{name} {p}: expected a probability in [0, 1]")
        self.word_drop_rate = float(word_drop_rate)
        self.word_drop_apply_prob = float(word_drop_apply_prob)
        self.backtrans_prob = float(backtrans_prob)

    @property
    def active(self) -> bool:
        """Whether any caption can change (otherwise the dataset keeps the original path)."""
        return (self.word_drop_rate > 0 and self.word_drop_apply_prob > 0) or self.backtrans_prob > 0

    def __call__(self, caption: str, caption_bt: Optional[str], rng: random.Random) -> str:
        """The augmented caption (``caption`` itself, the same object, when nothing changed).

        Args:
            caption: the annotated caption.
            caption_bt: its back-translation, or None / blank when it has none.
            rng: the sample's generator.
        """
        if rng.random() < self.backtrans_prob and caption_bt is not None and caption_bt.strip():
            caption = caption_bt
        if rng.random() < self.word_drop_apply_prob and self.word_drop_rate > 0:
            caption = drop_words(caption, self.word_drop_rate, rng)
        return caption

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(word_drop_rate={self.word_drop_rate}, "
                f"word_drop_apply_prob={self.word_drop_apply_prob}, backtrans_prob={self.backtrans_prob})")
