"""TBPS-CLIP's data side (``misc/data.py``, ``misc/caption_dataset.py``) on this codebase's datasets.

Training sample (the core's key names ``images`` / ``pids`` stand for TBPS's ``image`` / ``id``): ``images`` and
``aug1`` (two draws of TBPS's ``Choose`` pipeline: bilinear Resize, ToTensor, 2 ops of the ``--img_aug_pool``,
ImageNet Normalize), ``aug_ss_1`` / ``aug_ss_2`` (two draws of its SimCLR pipeline: RandomResizedCrop scale (0.2, 1),
ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale 0.2, GaussianBlur sigma U(0.1, 2) p 0.5, HorizontalFlip,
ImageNet Normalize), ``caption_ids`` (the caption after ``pre_caption`` and the ``--txt_aug_*`` augmentation,
back-translation then word deletion, tokenized) and ``pids`` (the identity).
Every draw comes from generators seeded per (seed, epoch, sample) as in ``datasets/bases.py``, not from the global
generators TBPS uses (its views differ from run to run with the number of loader workers).

Test time: bicubic Resize (antialiased) to the input size, ImageNet mean / std (not CLIP's); captions through
``pre_caption`` (77 words) and TBPS's ``tokenize``.

TBPS's trap: with no ``captions_bt`` in an annotation, its dataset puts ``""`` as every back-translation, and with
probability ``backtrans_p`` its forward swaps the caption for that empty string (whose EDA deletion then raises
``TypeError: sentence must be a valid sentence``). Here back-translation without any ``captions_bt`` is turned off
with a warning (:func:`caption_augment`); a caption with no back-translation stays as it is.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torchvision.transforms as T
from PIL import ImageFilter
from torch.utils.data import DataLoader

from datasets.augment import CaptionAugment
from datasets.bases import STREAM_IMAGE, ImageDataset, ImageTextDataset, TextDataset, TrainRow
from datasets.build import build_transforms
from methods.tbps.functions import PRE_CAPTION_MAX_WORDS, pre_caption
from utils.iotools import read_image

logger = logging.getLogger("IRRA.dataset")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TBPS's SimCLR view (misc/data.py: get_self_supervised_augmentation)
SS_CROP_SCALE = (0.2, 1.0)
SS_JITTER = (0.4, 0.4, 0.4, 0.1)
SS_JITTER_P = 0.8
SS_GRAYSCALE_P = 0.2
SS_BLUR_SIGMA = (0.1, 2.0)
SS_BLUR_P = 0.5


class GaussianBlur:
    """SimCLR's blur: PIL GaussianBlur with radius ~ U(sigma[0], sigma[1]) drawn from torch's default generator."""

    def __init__(self, sigma: Sequence[float] = SS_BLUR_SIGMA) -> None:
        self.sigma = tuple(sigma)

    def __call__(self, img):
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def eval_transform(img_size: Sequence[int]) -> T.Compose:
    """TBPS's test pipeline: bicubic (antialiased) resize to (H, W), ToTensor, ImageNet Normalize."""
    height, width = img_size
    return T.Compose([T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


def train_transform(img_size: Sequence[int], pool_ops: int = 2) -> T.Compose:
    """TBPS's ``Choose``: Resize, ToTensor, ``pool_ops`` ops of ``datasets.augment``'s pool, ImageNet Normalize."""
    return build_transforms(img_size=img_size, is_train=True, pool=True, pool_ops=pool_ops, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD)


def ss_transform(img_size: Sequence[int]) -> T.Compose:
    """TBPS's SimCLR view (module docstring)."""
    height, width = img_size
    return T.Compose([
        T.RandomResizedCrop((height, width), scale=SS_CROP_SCALE, antialias=True),
        T.RandomApply([T.ColorJitter(*SS_JITTER)], p=SS_JITTER_P),
        T.RandomGrayscale(p=SS_GRAYSCALE_P),
        T.RandomApply([GaussianBlur(SS_BLUR_SIGMA)], p=SS_BLUR_P),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def caption_augment(word_drop_rate: float, backtrans_prob: float,
                    captions_bt: Optional[Sequence[Optional[str]]], source: str = "the annotations",
                    word_drop_apply_prob: float = 1.0) -> Optional[CaptionAugment]:
    """TBPS's caption augmentation (back-translation with ``backtrans_prob``, then EDA deletion of each word with
    ``word_drop_rate``); back-translation is turned off, with a warning, when no caption has one. None when off."""
    n_bt = 0 if captions_bt is None else sum(bool(bt and bt.strip()) for bt in captions_bt)
    if backtrans_prob > 0 and n_bt == 0:
        logger.warning("--txt_aug_backtrans_prob %s: no train caption of %s has a back-translation ('captions_bt'): "
                       "back-translation is off (TBPS-CLIP would swap captions for empty strings)", backtrans_prob,
                       source)
        backtrans_prob = 0.0
    aug = CaptionAugment(word_drop_rate, word_drop_apply_prob, backtrans_prob)
    return aug if aug.active else None


class TBPSTrainDataset(ImageTextDataset):
    """Train rows -> TBPS's sample dict (module docstring). Captions (and back-translations) are ``pre_caption``'d
    here, before augmentation and tokenization, as TBPS's dataset does.

    Args:
        rows: the parser's train rows ``(pid, image_id, img_path, caption)``; ``pid`` becomes ``id``.
        img_size: (H, W).
        pool_ops: ops per ``image`` / ``aug1`` draw (TBPS: 2).
        with_ss: also make the SimCLR views (TBPS's SS loss).
        with_aug1: also make the second view ``aug1`` (MVS).
        max_words: ``pre_caption``'s word limit (TBPS: 77).
        Other arguments: :class:`~datasets.bases.ImageTextDataset`'s.
    """

    def __init__(self, rows: Sequence[TrainRow], img_size: Sequence[int], text_length: int = 77, seed: int = 0,
                 caption_aug: Optional[CaptionAugment] = None, captions_bt: Optional[Sequence[Optional[str]]] = None,
                 pool_ops: int = 2, with_ss: bool = True, with_aug1: bool = True,
                 max_words: int = PRE_CAPTION_MAX_WORDS, check_files: bool = True) -> None:
        rows = [(pid, image_id, path, pre_caption(caption, max_words)) for pid, image_id, path, caption in rows]
        if captions_bt is not None:
            captions_bt = [pre_caption(bt, max_words) if bt else None for bt in captions_bt]
        super().__init__(rows, train_transform(img_size, pool_ops), text_length=text_length, truncate=True,
                         check_files=check_files, seed=seed, caption_aug=caption_aug, captions_bt=captions_bt)
        self.ss_transform = ss_transform(img_size) if with_ss else None
        self.with_aug1 = bool(with_aug1)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        pid, _, img_path, _ = self.dataset[index]
        img = read_image(img_path)
        out: Dict[str, Any] = {"pids": pid, "caption_ids": self._caption_ids(index)}
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the default generator: seed it per sample
            torch.default_generator.manual_seed(self.sample_rng(index, STREAM_IMAGE))
            out["images"] = self.transform(img)
            if self.with_aug1:
                out["aug1"] = self.transform(img)
            if self.ss_transform is not None:
                out["aug_ss_1"] = self.ss_transform(img)
                out["aug_ss_2"] = self.ss_transform(img)
        return out


def eval_loaders(split: Dict[str, list], img_size: Sequence[int], text_length: int = 77, batch_size: int = 256,
                 num_workers: int = 0, max_words: int = PRE_CAPTION_MAX_WORDS) -> Tuple[DataLoader, DataLoader]:
    """(image loader, text loader) of an evaluation split (``img_paths``, ``image_pids``, ``captions``,
    ``caption_pids``) with TBPS's test-time preprocessing, for ``utils.metrics.Evaluator``."""
    img_set = ImageDataset(split["image_pids"], split["img_paths"], eval_transform(img_size))
    txt_set = TextDataset(split["caption_pids"], [pre_caption(c, max_words) for c in split["captions"]],
                          text_length=text_length)
    return (DataLoader(img_set, batch_size=batch_size, shuffle=False, num_workers=num_workers),
            DataLoader(txt_set, batch_size=batch_size, shuffle=False, num_workers=num_workers))

