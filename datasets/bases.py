"""The torch Datasets that feed IRRA (and, re-exported from ``datasets/annotations.py``, the parsing base class
``BaseDataset`` as in the original; the annotation format is documented there).

Captions are tokenized once per torch Dataset (an int32 ``[N, L]`` table); ``__getitem__`` returns a fresh copy, so
MLM masking never touches the cached ids.

Training samples draw every random choice (the transform's flip / crop / erasing, the MLM masks) from generators
seeded by :func:`sample_seed` ``(seed, epoch, index)``: the same sample in the same epoch is augmented the same way
whatever the number of loader workers or processes. The distributions are the original's (same transforms, same
masking algorithm); only the source of the random numbers changed. The optional caption augmentation
(``datasets/augment.py``, off by default) draws from its own stream, so it leaves the image and the MLM draws alone.
"""
from __future__ import annotations

import hashlib
import logging
import os
import os.path as op
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from datasets.augment import CaptionAugment
from datasets.check import check_image_files  # the exists level of the image check (was defined here)
from utils.iotools import read_image
from utils.run_dir import atomic_write

logger = logging.getLogger("IRRA.dataset")

# Re-exported for code written against the original (datasets.bases.tokenize).
from utils.simple_tokenizer import SimpleTokenizer, get_tokenizer, tokenize  # noqa: E402

from datasets.annotations import (BACKTRANS_KEY, BaseDataset, DatasetFormatError, EvalSplit,  # noqa: E402,F401
                                  TrainRow)

# Caption counts from which tokenize_all logs that it is working (CUHK-PEDES: ~20 s for 68k captions on one core).
LOG_TOKENIZE_ABOVE = 10000


def tokenize_all(captions: Sequence[str], tokenizer: SimpleTokenizer, text_length: int = 77,
                 truncate: bool = True, what: str = "captions") -> torch.Tensor:
    """Tokenize every distinct caption once; returns int32 ids ``[len(captions), text_length]``. Logs once how many
    captions ``text_length`` cuts ("<what>: N of M captions cut at L tokens")."""
    cache: Dict[str, Tuple[torch.Tensor, bool]] = {}
    out = torch.zeros(len(captions), text_length, dtype=torch.int32)  # [N, L]
    if len(captions) >= LOG_TOKENIZE_ABOVE:
        logger.info("tokenizing %d captions once (cached for all epochs)", len(captions))
    n_cut = 0
    for i, c in enumerate(captions):
        hit = cache.get(c)
        if hit is None:
            ids, cut = tokenize(c, tokenizer, text_length=text_length, truncate=truncate, return_cut=True)
            hit = cache[c] = (ids.to(torch.int32), cut)
        out[i] = hit[0]
        n_cut += hit[1]
    if captions:
        logger.info("%s: %d of %d captions cut at %d tokens (--text_length)", what, n_cut, len(captions), text_length)
    return out


# Streams of one sample's random draws (distinct seeds from the same (seed, epoch, index)): the image transform, the
# MLM masks, the caption augmentation.
STREAM_IMAGE, STREAM_TEXT, STREAM_CAPTION = 0, 1, 2
STREAM_TOKEN_AUG = 3  # --txt_aug token augmentation

# --txt_aug (RDE's token augmentation): each word token hit with this probability, then masked / replaced / deleted in these proportions.
TOKEN_AUG_PROB, TOKEN_AUG_MASK, TOKEN_AUG_REPLACE = 0.20, 0.6, 0.2  # deleted: the remaining 0.2


def token_augment(tokens: torch.Tensor, rng: random.Random, mask_token: int) -> torch.Tensor:
    """RDE's token-level caption augmentation (``ImageTextDataset.txt_data_aug``): tokens [L] ids -> [L] ids.

    Each word token (``0 < id < mask_token``: not padding, SOT, EOT or the mask) is hit with probability 0.2; a hit
    token becomes ``mask_token`` (60 %), a random id in [1, mask_token) (20 %) or is deleted (20 %, the rest shifts
    left and zeros fill the end). Draws from ``rng`` in RDE's order."""
    aug = []
    token_range = range(1, mask_token)
    for token in tokens.tolist():
        if 0 < token < mask_token:
            prob = rng.random()
            if prob < TOKEN_AUG_PROB:
                prob /= TOKEN_AUG_PROB
                if prob < TOKEN_AUG_MASK:
                    aug.append(mask_token)
                elif prob < TOKEN_AUG_MASK + TOKEN_AUG_REPLACE:
                    aug.append(rng.choice(token_range))
                # else: deleted
            else:
                aug.append(token)
        else:
            aug.append(token)
    out = torch.zeros_like(tokens)
    out[:len(aug)] = torch.tensor(aug, dtype=tokens.dtype)
    return out


def sample_seed(seed: int, epoch: int, index: int, stream: int = STREAM_IMAGE) -> int:
    """A 63-bit seed that depends only on ``(seed, epoch, index, stream)`` (a hash: neighbours are unrelated)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


class ImageTextDataset(Dataset):
    """Train rows ``(pid, image_id, img_path, caption)`` -> dict(pids, image_ids, images, caption_ids).

    ``seed`` and the epoch (``set_epoch``) seed each sample's random draws (module docstring).

    Args:
        dataset: the parser's train rows.
        transform: the image transform (its random draws are seeded per sample).
        text_length, truncate, tokenizer: tokenization of the captions (``tokenize``).
        check_files: raise at once if an image file is missing.
        seed: the run's seed.
        caption_aug: optional ``datasets.augment.CaptionAugment``: each sample's caption is augmented (from the
            ``STREAM_CAPTION`` generator) and tokenized on the fly when it changed; an inactive one is ignored.
        captions_bt: the rows' back-translations (the parser's ``train_captions_bt``), needed by a ``caption_aug``
            with back-translation.
    """

    def __init__(self, dataset: List[TrainRow], transform: Optional[Callable] = None, text_length: int = 77,
                 truncate: bool = True, tokenizer: Optional[SimpleTokenizer] = None, check_files: bool = True,
                 seed: int = 0, caption_aug: Optional[CaptionAugment] = None,
                 captions_bt: Optional[Sequence[Optional[str]]] = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.text_length = text_length
        self.truncate = truncate
        self.seed = int(seed)
        self.epoch = 0
        if check_files:
            check_image_files([row[2] for row in dataset], "train set")
        if captions_bt is not None and len(captions_bt) != len(dataset):
            raise ValueError(f"ImageTextDataset: {len(captions_bt)} back-translations for {len(dataset)} train rows")
        if caption_aug is not None and caption_aug.backtrans_prob > 0 and captions_bt is None:
            raise ValueError("ImageTextDataset: caption_aug uses back-translations but captions_bt is None")
        self.caption_aug = caption_aug if caption_aug is not None and caption_aug.active else None
        self.captions_bt = captions_bt
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        self.caption_ids = tokenize_all([row[3] for row in dataset], self.tokenizer, text_length, truncate, "train")
        # set by datasets.build: each sample also returns its "index" (a method's hooks look samples up by it);
        # ``token_aug`` turns on --txt_aug;
        # ``real_correspondences`` [N] (1 = the pair is true) when noise was injected
        self.with_index = False
        self.token_aug = False
        self.real_correspondences = None

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of epoch ``epoch`` (the trainer calls it through ``set_train_epoch``)."""
        self.epoch = int(epoch)

    def sample_rng(self, index: int, stream: int) -> int:
        """The seed of sample ``index``'s draws of ``stream`` in the current epoch."""
        return sample_seed(self.seed, self.epoch, index, stream)

    def caption(self, index: int) -> str:
        """Sample ``index``'s caption in the current epoch (augmented when a caption augmentation is on)."""
        caption = self.dataset[index][3]
        if self.caption_aug is None:
            return caption
        caption_bt = self.captions_bt[index] if self.captions_bt is not None else None
        return self.caption_aug(caption, caption_bt, random.Random(self.sample_rng(index, STREAM_CAPTION)))

    def _caption_ids(self, index: int) -> torch.Tensor:
        ids = None
        if self.caption_aug is not None:
            caption = self.caption(index)
            if caption != self.dataset[index][3]:  # changed: tokenize it now
                ids = tokenize(caption, self.tokenizer, text_length=self.text_length, truncate=self.truncate)
        if ids is None:
            ids = self.caption_ids[index].long()  # .long() copies the cached row
        if self.token_aug:
            ids = token_augment(ids, random.Random(self.sample_rng(index, STREAM_TOKEN_AUG)),
                                    self.tokenizer.encoder["<|mask|>"])
        return ids

    def _load(self, index: int) -> Tuple[int, int, Any, torch.Tensor]:
        pid, image_id, img_path, _ = self.dataset[index]
        img = read_image(img_path)
        if self.transform is not None:
            # torchvision's random transforms draw from torch's default CPU generator: seed it for this sample
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(self.sample_rng(index, STREAM_IMAGE))
                img = self.transform(img)
        return pid, image_id, img, self._caption_ids(index)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        pid, image_id, img, caption_ids = self._load(index)
        out = {"pids": pid, "image_ids": image_id, "images": img, "caption_ids": caption_ids}
        if self.with_index:
            out["index"] = index
        return out


class ImageDataset(Dataset):
    """Gallery images -> ``(pid, img)``."""

    def __init__(self, image_pids: Sequence[int], img_paths: Sequence[str], transform: Optional[Callable] = None,
                 check_files: bool = True) -> None:
        if len(image_pids) != len(img_paths):
            raise ValueError(f"ImageDataset: {len(image_pids)} pids but {len(img_paths)} image paths")
        self.image_pids = image_pids
        self.img_paths = img_paths
        self.transform = transform
        if check_files:
            check_image_files(img_paths, "evaluation set")

    def __len__(self) -> int:
        return len(self.image_pids)

    def __getitem__(self, index: int) -> Tuple[int, Any]:
        img = read_image(self.img_paths[index])
        if self.transform is not None:
            img = self.transform(img)
        return self.image_pids[index], img


class TextDataset(Dataset):
    """Query captions -> ``(pid, caption_ids [L])``."""

    def __init__(self, caption_pids: Sequence[int], captions: Sequence[str], text_length: int = 77,
                 truncate: bool = True, tokenizer: Optional[SimpleTokenizer] = None,
                 tokenize_fn: Optional[Callable[[str], torch.Tensor]] = None, split: str = "query") -> None:
        """``tokenize_fn``: caption -> ids [text_length] (a method's own test-time tokenization); default the CLIP
        tokenization at ``text_length`` (cut with ``truncate``). ``split``: the split's name in the log line that
        counts the captions ``text_length`` cuts."""
        if len(caption_pids) != len(captions):
            raise ValueError(f"TextDataset: {len(caption_pids)} pids but {len(captions)} captions")
        self.caption_pids = caption_pids
        self.captions = captions
        self.text_length = text_length
        self.truncate = truncate
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        if tokenize_fn is None:
            self.caption_ids = tokenize_all(captions, self.tokenizer, text_length, truncate, split)
        else:
            self.caption_ids = torch.stack([tokenize_fn(c) for c in captions]) if captions else \
                torch.zeros(0, text_length, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.caption_pids)

    def __getitem__(self, index: int) -> Tuple[int, torch.Tensor]:
        return self.caption_pids[index], self.caption_ids[index].long()


def build_random_masked_tokens_and_labels(
        tokens: List[int], mask_token: int, rng: Any = random, mlm_probability: float = 0.15,
        masked_token_rate: float = 0.8, masked_token_unchanged_rate: float = 0.1,
        force_position: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of one caption (the original's algorithm and RNG-consumption order).

    Every token with ``0 < id < mask_token`` (i.e. not padding, not a special token) is chosen with probability
    ``mlm_probability``; a chosen token becomes ``mask_token`` with prob. ``masked_token_rate``, a random id in
    ``[1, mask_token)`` with prob. ``1 - masked_token_rate - masked_token_unchanged_rate`` and stays unchanged
    otherwise. If nothing was chosen, position ``force_position`` is masked. ``tokens`` is not modified.

    Returns ``(mlm_ids [L], mlm_labels [L])`` long tensors; labels hold the original id at chosen positions, else 0.
    """
    tokens = list(tokens)
    random_upper = masked_token_rate + (1.0 - masked_token_rate - masked_token_unchanged_rate)
    token_range = range(1, mask_token)
    labels = [0] * len(tokens)
    for i, token in enumerate(tokens):
        if 0 < token < mask_token:
            prob = rng.random()
            if prob < mlm_probability:
                prob /= mlm_probability
                if prob < masked_token_rate:
                    tokens[i] = mask_token
                elif prob < random_upper:
                    tokens[i] = rng.choice(token_range)
                labels[i] = token
    if not any(labels):
        labels[force_position] = tokens[force_position]
        tokens[force_position] = mask_token
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


class ImageTextMLMDataset(ImageTextDataset):
    """ImageTextDataset plus ``mlm_ids`` / ``mlm_labels`` (BERT-style masking as the original, drawn from a
    ``random.Random`` seeded per sample).

    ``mlm_mask_caption=False`` (default) returns clean ``caption_ids``; ``True`` reproduces the original, whose
    in-place masking made ``caption_ids`` equal to ``mlm_ids``. With a caption augmentation the masks are drawn on
    the augmented caption.
    """

    def __init__(self, dataset: List[TrainRow], transform: Optional[Callable] = None, text_length: int = 77,
                 truncate: bool = True, tokenizer: Optional[SimpleTokenizer] = None, check_files: bool = True,
                 mlm_probability: float = 0.15, masked_token_rate: float = 0.8,
                 masked_token_unchanged_rate: float = 0.1, mlm_mask_caption: bool = False, seed: int = 0,
                 caption_aug: Optional[CaptionAugment] = None,
                 captions_bt: Optional[Sequence[Optional[str]]] = None) -> None:
        super().__init__(dataset, transform, text_length, truncate, tokenizer, check_files, seed, caption_aug,
                         captions_bt)
        for name, p in (("mlm_probability", mlm_probability), ("masked_token_rate", masked_token_rate),
                        ("masked_token_unchanged_rate", masked_token_unchanged_rate)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if masked_token_rate + masked_token_unchanged_rate > 1.0:
            raise ValueError(f"masked_token_rate + masked_token_unchanged_rate must be <= 1, got "
                             f"{masked_token_rate} + {masked_token_unchanged_rate}")
        if mlm_probability == 0.0:
            raise ValueError("mlm_probability must be > 0")
        self.mlm_probability = mlm_probability
        self.masked_token_rate = masked_token_rate
        self.masked_token_unchanged_rate = masked_token_unchanged_rate
        self.mlm_mask_caption = mlm_mask_caption
        self.mask_token = self.tokenizer.encoder["<|mask|>"]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        pid, image_id, img, caption_ids = self._load(index)
        rng = random.Random(self.sample_rng(index, STREAM_TEXT))
        mlm_ids, mlm_labels = build_random_masked_tokens_and_labels(
            caption_ids.tolist(), self.mask_token, rng, self.mlm_probability, self.masked_token_rate,
            self.masked_token_unchanged_rate)
        if self.mlm_mask_caption:
            caption_ids = mlm_ids.clone()
        return {"pids": pid, "image_ids": image_id, "images": img, "caption_ids": caption_ids,
                "mlm_ids": mlm_ids, "mlm_labels": mlm_labels}


def _save_npy_atomic(path: str, array) -> None:
    """np.save to ``path`` through ``utils.run_dir.atomic_write`` (no half-written file; its folder is made)."""
    import numpy as np
    os.makedirs(op.dirname(op.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: np.save(f, array), binary=True)


def draw_noisy_index(num_rows: int, noisy_rate: float, seed: int):
    """RDE's noise model from ``(seed, noisy_rate)``: ``int(noisy_rate * num_rows)`` rows, drawn at random, get their
    captions permuted among themselves (a row may draw its own caption back, it then stays clean). Returns the
    ``noisy_index`` int64 array [num_rows]: row i gets the caption of row ``noisy_index[i]``."""
    import numpy as np
    rng = np.random.default_rng([int(seed), 15])  # 15: this draw's stream, apart from other uses of the seed
    index = np.arange(num_rows, dtype=np.int64)
    chosen = rng.permutation(num_rows)[:int(noisy_rate * num_rows)]
    index[chosen] = rng.permutation(chosen)
    return index


def load_noisy_index(path: str, num_rows: int):
    """Read an RDE noise index file (``.npy``, int [num_rows], values in [0, num_rows)); errors name the file."""
    import numpy as np
    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--noisy_file {path}: not a readable .npy int array ({e})") from e
    if index.ndim != 1 or index.shape[0] != num_rows or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"--noisy_file {path}: expected a 1-D int array of {num_rows} entries (one per train pair), "
                         f"got {index.dtype} {list(index.shape)}")
    if num_rows and (index.min() < 0 or index.max() >= num_rows):
        raise ValueError(f"--noisy_file {path}: indices must lie in [0, {num_rows}), got [{index.min()}, "
                         f"{index.max()}]")
    return index.astype(np.int64)


def inject_noisy_correspondence(dataset: Sequence[TrainRow], noisy_rate: float, noisy_file: Optional[str] = None,
                                seed: int = 0):
    """Simulated noisy correspondences (RDE's ``inject_noisy_correspondence``): returns ``(rows, real_correspondences)``.

    ``dataset``: train rows ``(pid, image_id, img_path, caption)`` (not modified; RDE wrote into it). Row i of the
    result keeps its pid, image id and image and gets the caption of row ``noisy_index[i]``; ``real_correspondences``
    is an int array [N], 1 where ``noisy_index[i] == i`` (the pair is still true).

    ``noisy_rate == 0``: nothing changes (no file is read). Otherwise ``noisy_index`` comes from ``noisy_file`` when
    it exists (RDE's shipped ``noiseindex/<dataset>_<rate>.npy`` give RDE's exact noisy sets), else it is drawn from
    ``seed`` and the rate (:func:`draw_noisy_index`; RDE's own draw was not seeded) and written to ``noisy_file``
    (atomically) when one is named. The clean / noisy counts are logged.
    """
    rows = list(dataset)
    noisy_index = noisy_correspondence_index(len(rows), noisy_rate, noisy_file, seed)
    return permute_captions(rows, noisy_index), real_correspondences(noisy_index, noisy_rate)


def permute_captions(rows: Sequence[TrainRow], noisy_index) -> List[TrainRow]:
    """Row i keeps its pid, image id and image and gets the caption of row ``noisy_index[i]``."""
    return [(r[0], r[1], r[2], rows[int(j)][3]) for r, j in zip(rows, noisy_index)]


def real_correspondences(noisy_index, noisy_rate: float = 0.0):
    """noisy_index [N] -> int array [N], 1 where row i kept its own caption; logs the clean / noisy counts."""
    import numpy as np
    real = (np.asarray(noisy_index) == np.arange(len(noisy_index))).astype(np.int64)
    logger.info("=> noisy rate %s (measured %.4f): clean pairs %d, noisy pairs %d, total pairs %d", noisy_rate,
                measured_noisy_rate(real), int(real.sum()), len(real) - int(real.sum()), len(real))
    return real


# A file drawn at rate r moves int(r * N) rows, permuted among themselves; a moved row that draws its own caption back
# stays clean (a random permutation keeps about one element in place; 9 or more with probability ~1e-6). So a file
# whose noisy rows are within 1 (rounding) + 8 rows of r * N is taken to be at rate r.
NOISY_RATE_SLACK_ROWS = 1 + 8


def measured_noisy_rate(real) -> float:
    """The noise rate a training set really has: real_correspondences [N] (1 = row i kept its own caption, RDE's
    definition) -> the fraction of rows that did not; 0.0 for no rows."""
    import numpy as np
    real = np.asarray(real)
    return float((real == 0).sum() / len(real)) if len(real) else 0.0


def check_noisy_rate(noisy_index, noisy_rate: float, path: str) -> float:
    """Compare the noise rate of an index file with ``--noisy_rate``; returns the measured rate. The file wins (RDE
    reads it whatever the rate), but a file whose noisy rows differ from ``noisy_rate * N`` by more than
    :data:`NOISY_RATE_SLACK_ROWS` gets a warning naming both rates and the file."""
    import numpy as np
    index = np.asarray(noisy_index)
    moved = int((index != np.arange(len(index))).sum())
    measured = moved / len(index) if len(index) else 0.0
    if abs(moved - float(noisy_rate) * len(index)) > NOISY_RATE_SLACK_ROWS:
        logger.warning("--noisy_file %s permutes %.4f of the %d training pairs, but --noisy_rate is %s: training "
                       "uses the file's rate %.4f (the run records it as noisy_rate_measured)", path, measured,
                       len(index), noisy_rate, measured)
    return measured


def noisy_correspondence_index(nums: int, noisy_rate: float, noisy_file: Optional[str] = None, seed: int = 0):
    """The ``noisy_index`` [nums] of :func:`inject_noisy_correspondence` (read, or drawn and written)."""
    import numpy as np
    if not 0.0 <= float(noisy_rate) <= 1.0:
        raise ValueError(f"--noisy_rate {noisy_rate}: expected a fraction in [0, 1]")
    noisy_index = np.arange(nums, dtype=np.int64)
    if noisy_rate > 0:
        if noisy_file and op.exists(noisy_file):
            logger.info("=> noisy index loaded from %s", noisy_file)
            noisy_index = load_noisy_index(noisy_file, nums)
            check_noisy_rate(noisy_index, noisy_rate, noisy_file)
        else:
            noisy_index = draw_noisy_index(nums, noisy_rate, seed)
            if noisy_file:
                _save_npy_atomic(noisy_file, noisy_index)
                logger.info("=> noisy index drawn from seed %d and written to %s", seed, noisy_file)
    return noisy_index
