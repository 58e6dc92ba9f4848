"""Dataset parsing base class and the torch Datasets that feed IRRA.

Annotation format (CUHK-PEDES ``reid_raw.json``, ICFG-PEDES ``ICFG-PEDES.json``, RSTPReid ``data_captions.json``):
a json list of entries ``{"split": "train"|"test"|other (-> val), "id": int, <path_key>: str, "captions": [str]}``.
An entry may also hold ``"captions_bt": [str]``, the back-translations of its captions (the key TBPS-CLIP reads),
aligned one-to-one: ``captions_bt[j]`` is the back-translation of ``captions[j]``, ``""`` where a caption has none; a
list of another length is a DatasetFormatError naming the entry. Only the train split uses them
(``--txt_aug_backtrans_prob``).

Parsed splits (identical to the original IRRA):
- ``train``: list of ``(pid, image_id, img_path, caption)``, one row per caption; ``image_id`` counts train images in
  file order; pids must be 0..N-1 without gaps.
- ``train_captions_bt``: None when no train entry has ``captions_bt``; else a list aligned with ``train`` holding each
  row's back-translation, or None where the row has none.
- ``test`` / ``val``: dicts ``{"image_pids", "img_paths", "caption_pids", "captions"}`` in file order.

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
import os.path as op
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from prettytable import PrettyTable
from torch.utils.data import Dataset

from datasets.augment import CaptionAugment
from utils.iotools import open_image, read_image, read_json

logger = logging.getLogger("IRRA.dataset")

# Re-exported for code written against the original (datasets.bases.tokenize).
from utils.simple_tokenizer import SimpleTokenizer, get_tokenizer, tokenize  # noqa: E402

TrainRow = Tuple[int, int, str, str]
EvalSplit = Dict[str, list]

# How many missing image paths are quoted in the error message.
MAX_MISSING_SHOWN = 5
# Caption counts from which tokenize_all logs that it is working (CUHK-PEDES: ~20 s for 68k captions on one core).
LOG_TOKENIZE_ABOVE = 10000
# The annotation key of the captions' back-translations (TBPS-CLIP's name).
BACKTRANS_KEY = "captions_bt"


class DatasetFormatError(ValueError):
    """An annotation file holds an entry that cannot be parsed."""


class BaseDataset:
    """Parses ``<root>/<dataset_dir>/{imgs/, <annotation json>}`` into train / test / val.

    Subclasses set the class attributes below; ``__init__`` does the work the original did per dataset.
    """

    logger = logger
    dataset_dir: str = ""                    # folder under root
    anno_files: Tuple[str, ...] = ()        # accepted annotation file names (first that exists wins)
    path_key: str = "file_path"             # entry key holding the image path relative to imgs/
    train_pid_offset: int = 0               # train pid = int(id) - train_pid_offset (CUHK-PEDES ids are 1-based)
    source_url: str = ""                    # where to get the data
    expected_tree: str = ""                 # the expected layout under <root>/<dataset_dir>/
    display_name: str = ""

    def __init__(self, root: str = "", verbose: bool = True) -> None:
        self.root = root
        self.dataset_dir = op.join(root, type(self).dataset_dir)
        self.img_dir = op.join(self.dataset_dir, "imgs/")
        self.anno_path = self._check_before_run()
        annos = self._read_annos(self.anno_path)
        self.train_annos, self.test_annos, self.val_annos = self._split_anno(annos)
        self.train, self.train_id_container = self._process_anno(self.train_annos, training=True)
        self.train_captions_bt = self._process_backtrans(self.train_annos)
        self.test, self.test_id_container = self._process_anno(self.test_annos)
        self.val, self.val_id_container = self._process_anno(self.val_annos)
        if verbose:
            self.logger.info("=> %s Images and Captions are loaded", self.display_name or type(self).dataset_dir)
            self.show_dataset_info()

    # ------------------------------------------------------------------ parsing
    def _layout_help(self) -> str:
        name = type(self).dataset_dir
        return (f"Expected layout for {self.display_name or name}:\n"
                f"  {op.join(self.root, name)}/\n{self.expected_tree}"
                f"Get the data from {self.source_url} and point --root_dir at the folder that contains '{name}/'.")

    def _check_before_run(self) -> str:
        """Check the dataset folder, imgs/ and the annotation file; return the annotation path."""
        anno_paths = [op.join(self.dataset_dir, f) for f in self.anno_files]
        problems = []
        if not op.isdir(self.dataset_dir):
            problems.append(f"dataset folder '{self.dataset_dir}' is not available")
        else:
            if not op.isdir(self.img_dir):
                problems.append(f"image folder '{self.img_dir}' is not available")
            if not any(op.isfile(p) for p in anno_paths):
                problems.append("annotation file " + " or ".join(f"'{p}'" for p in anno_paths) + " is not available")
        if problems:
            raise FileNotFoundError("; ".join(problems) + ".\n" + self._layout_help())
        return next(p for p in anno_paths if op.isfile(p))

    def _read_annos(self, anno_path: str) -> List[dict]:
        """Read and validate the annotation list; drop empty / whitespace-only captions (with a warning)."""
        annos = read_json(anno_path)
        if not isinstance(annos, list):
            raise DatasetFormatError(f"{anno_path}: expected a JSON list of entries, got {type(annos).__name__}")
        required = ("split", "id", self.path_key, "captions")
        cleaned, n_dropped, n_entries_dropped = [], 0, 0
        for i, anno in enumerate(annos):
            where = f"{anno_path}: entry {i}"
            if not isinstance(anno, dict):
                raise DatasetFormatError(f"{where}: expected an object, got {type(anno).__name__}")
            for key in required:
                if key not in anno:
                    raise DatasetFormatError(f"{where}: missing key '{key}' (entries need {list(required)})")
            pid = anno["id"]
            if isinstance(pid, bool) or not isinstance(pid, (int, str)) or not _is_int(pid):
                raise DatasetFormatError(f"{where}: key 'id' must be an integer, got {pid!r}")
            if not isinstance(anno[self.path_key], str) or not anno[self.path_key]:
                raise DatasetFormatError(f"{where}: key '{self.path_key}' must be a non-empty string, "
                                         f"got {anno[self.path_key]!r}")
            caps = anno["captions"]
            if not isinstance(caps, list) or len(caps) == 0:
                raise DatasetFormatError(f"{where}: key 'captions' must be a non-empty list of strings, got {caps!r}")
            for j, c in enumerate(caps):
                if not isinstance(c, str):
                    raise DatasetFormatError(f"{where}: key 'captions'[{j}] must be a string, got {c!r}")
            bts = self._check_backtrans(anno, where)
            kept = [j for j, c in enumerate(caps) if c.strip()]
            n_dropped += len(caps) - len(kept)
            if not kept:  # an image with no usable caption would add an identity with no training text
                n_entries_dropped += 1
                continue
            entry = {**anno, "id": int(pid), "captions": [caps[j] for j in kept]}
            if bts is not None:  # stays aligned with the kept captions
                entry[BACKTRANS_KEY] = [bts[j] for j in kept]
            cleaned.append(entry)
        if n_dropped:
            self.logger.warning("%s: dropped %d empty/whitespace-only captions (%d entries left without any caption "
                                "were dropped too)", anno_path, n_dropped, n_entries_dropped)
        return cleaned

    @staticmethod
    def _check_backtrans(anno: dict, where: str) -> Optional[List[str]]:
        """The entry's ``captions_bt`` (checked: a list of strings as long as ``captions``), or None without one."""
        if BACKTRANS_KEY not in anno:
            return None
        bts, caps = anno[BACKTRANS_KEY], anno["captions"]
        if not isinstance(bts, list):
            raise DatasetFormatError(f"{where}: key '{BACKTRANS_KEY}' must be a list of strings, got {bts!r}")
        if len(bts) != len(caps):
            raise DatasetFormatError(
                f"{where}: key '{BACKTRANS_KEY}' has {len(bts)} items but 'captions' has {len(caps)}; they must be "
                f"aligned one-to-one ('{BACKTRANS_KEY}'[j] is the back-translation of 'captions'[j], \"\" for none)")
        for j, c in enumerate(bts):
            if not isinstance(c, str):
                raise DatasetFormatError(f"{where}: key '{BACKTRANS_KEY}'[{j}] must be a string, got {c!r}")
        return bts

    def _split_anno(self, annos: List[dict]) -> Tuple[List[dict], List[dict], List[dict]]:
        """split 'train' -> train, 'test' -> test, anything else -> val (as the original)."""
        train, test, val = [], [], []
        for anno in annos:
            if anno["split"] == "train":
                train.append(anno)
            elif anno["split"] == "test":
                test.append(anno)
            else:
                val.append(anno)
        return train, test, val

    def _process_anno(self, annos: List[dict], training: bool = False):
        pid_container = set()
        if training:
            dataset: List[TrainRow] = []
            for image_id, anno in enumerate(annos):
                pid = anno["id"] - self.train_pid_offset
                pid_container.add(pid)
                img_path = op.join(self.img_dir, anno[self.path_key])
                for caption in anno["captions"]:
                    dataset.append((pid, image_id, img_path, caption))
            self._check_contiguous_pids(pid_container)
            return dataset, pid_container
        img_paths, captions, image_pids, caption_pids = [], [], [], []
        for anno in annos:
            pid = anno["id"]
            pid_container.add(pid)
            img_paths.append(op.join(self.img_dir, anno[self.path_key]))
            image_pids.append(pid)
            for caption in anno["captions"]:
                captions.append(caption)
                caption_pids.append(pid)
        split = {"image_pids": image_pids, "img_paths": img_paths, "caption_pids": caption_pids, "captions": captions}
        return split, pid_container

    @staticmethod
    def _process_backtrans(annos: List[dict]) -> Optional[List[Optional[str]]]:
        """Back-translations aligned with the train rows of :meth:`_process_anno` (one per caption, in the same
        order): None when no entry has ``captions_bt``; else a list with None where a row has none (blank)."""
        if not any(BACKTRANS_KEY in anno for anno in annos):
            return None
        out: List[Optional[str]] = []
        for anno in annos:
            bts = anno.get(BACKTRANS_KEY) or [""] * len(anno["captions"])
            out.extend(bt if bt.strip() else None for bt in bts)
        return out

    def _check_contiguous_pids(self, pid_container: set) -> None:
        """Train pids index the ID classifier, so they must be exactly 0..N-1."""
        for expected, pid in enumerate(sorted(pid_container)):
            if pid != expected:
                raw = pid + self.train_pid_offset
                raise DatasetFormatError(
                    f"{self.anno_path}: train pids must be 0..{len(pid_container) - 1} without gaps "
                    f"(pid = id - {self.train_pid_offset}); first offending id is {raw} (pid {pid}), "
                    f"expected pid {expected} (id {expected + self.train_pid_offset})")

    # ------------------------------------------------------------------ info
    def show_dataset_info(self) -> None:
        """Log a table of ids / images / captions per split."""
        table = PrettyTable(["subset", "ids", "images", "captions"])
        table.add_row(["train", len(self.train_id_container), len(self.train_annos), len(self.train)])
        table.add_row(["test", len(self.test_id_container), len(self.test["img_paths"]), len(self.test["captions"])])
        table.add_row(["val", len(self.val_id_container), len(self.val["img_paths"]), len(self.val["captions"])])
        self.logger.info("%s statistics:\n%s", type(self).__name__, table)


def _is_int(value: Any) -> bool:
    if isinstance(value, int):
        return True
    try:
        int(value.strip())
        return True
    except ValueError:
        return False


def check_image_files(img_paths: Sequence[str], what: str = "dataset") -> None:
    """Raise one FileNotFoundError if any image path is missing (count + the first few)."""
    unique = list(dict.fromkeys(img_paths))
    missing = [p for p in unique if not op.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:MAX_MISSING_SHOWN])
        raise FileNotFoundError(
            f"{len(missing)} of {len(unique)} image files of the {what} are missing; first "
            f"{min(len(missing), MAX_MISSING_SHOWN)}:\n  {shown}\nCheck --root_dir and the dataset's imgs/ folder.")


def tokenize_all(captions: Sequence[str], tokenizer: SimpleTokenizer, text_length: int = 77,
                 truncate: bool = True) -> torch.Tensor:
    """Tokenize every distinct caption once; returns int32 ids ``[len(captions), text_length]``."""
    cache: Dict[str, torch.Tensor] = {}
    out = torch.zeros(len(captions), text_length, dtype=torch.int32)  # [N, L]
    if len(captions) >= LOG_TOKENIZE_ABOVE:
        logger.info("tokenizing %d captions once (cached for all epochs)", len(captions))
    for i, c in enumerate(captions):
        ids = cache.get(c)
        if ids is None:
            ids = cache[c] = tokenize(c, tokenizer, text_length=text_length, truncate=truncate).to(torch.int32)
        out[i] = ids
    return out


# Streams of one sample's random draws (distinct seeds from the same (seed, epoch, index)): the image transform, the
# MLM masks, the caption augmentation.
STREAM_IMAGE, STREAM_TEXT, STREAM_CAPTION = 0, 1, 2


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
        self.caption_ids = tokenize_all([row[3] for row in dataset], self.tokenizer, text_length, truncate)

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
        if self.caption_aug is not None:
            caption = self.caption(index)
            if caption != self.dataset[index][3]:  # changed: tokenize it now
                return tokenize(caption, self.tokenizer, text_length=self.text_length, truncate=self.truncate)
        return self.caption_ids[index].long()  # .long() copies the cached row

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
        return {"pids": pid, "image_ids": image_id, "images": img, "caption_ids": caption_ids}


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


# What opening an arbitrary image file can raise (PIL.UnidentifiedImageError is an OSError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


class ImageFileDataset(Dataset):
    """Image files by path -> ``(index, img)``; a file that cannot be read gives ``(index, None)`` instead of raising.

    For galleries of arbitrary photos (visualize.py --gallery): the caller skips and reports the unreadable ones
    (batch with :func:`collate_skip_unreadable`). One read attempt per file, through ``utils.iotools.open_image``.
    """

    def __init__(self, img_paths: Sequence[str], transform: Optional[Callable] = None) -> None:
        self.img_paths = list(img_paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.img_paths)

    def __getitem__(self, index: int) -> Tuple[int, Any]:
        try:
            img = open_image(self.img_paths[index])
        except UNREADABLE_IMAGE_ERRORS:
            return index, None
        return index, self.transform(img) if self.transform is not None else img


def collate_skip_unreadable(batch: List[Tuple[int, Optional[torch.Tensor]]]
                            ) -> Tuple[List[int], Optional[torch.Tensor], List[int]]:
    """Collate :class:`ImageFileDataset` items: (read indices, their images stacked [B, 3, H, W] or None, failed)."""
    ok = [(i, x) for i, x in batch if x is not None]
    failed = [i for i, x in batch if x is None]
    if not ok:
        return [], None, failed
    return [i for i, _ in ok], torch.stack([x for _, x in ok]), failed


class TextDataset(Dataset):
    """Query captions -> ``(pid, caption_ids [L])``."""

    def __init__(self, caption_pids: Sequence[int], captions: Sequence[str], text_length: int = 77,
                 truncate: bool = True, tokenizer: Optional[SimpleTokenizer] = None) -> None:
        if len(caption_pids) != len(captions):
            raise ValueError(f"TextDataset: {len(caption_pids)} pids but {len(captions)} captions")
        self.caption_pids = caption_pids
        self.captions = captions
        self.text_length = text_length
        self.truncate = truncate
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        self.caption_ids = tokenize_all(captions, self.tokenizer, text_length, truncate)

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
