"""Dataset registry, transforms, collate and the dataloaders.

A run's numbers depend only on its options and seed, not on ``--num_workers`` or the number of processes:
- every random choice made for a training sample (flip, pad/crop, erasing, the ``--img_aug_pool`` ops, the
  ``--txt_aug_*`` caption augmentation, MLM masks) is drawn from generators seeded by ``(seed, epoch, sample index)``
  inside the dataset (``datasets/bases.py:sample_seed``), so the same sample in the same epoch gets the same
  augmentation in any worker, on any rank;
- the samplers' order is a function of ``(seed, epoch)``: identity -> RandomIdentitySampler; random ->
  EpochRandomSampler. Under DDP every rank takes its consecutive slice of each global batch of that same order
  (RandomIdentitySampler_DDP / DistributedRandomSampler), so the ranks together see the one-process batches (the
  random sampler drops the last incomplete global batch there, which one process keeps);
- :func:`set_train_epoch` (called by the trainer before each epoch) sets the epoch of the sampler and of the dataset;
  workers are started anew each epoch (no persistent workers), so they see it.
"""
from __future__ import annotations

import argparse
import logging
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import BatchSampler, DataLoader

from datasets.augment import CaptionAugment, RandomOpsPool, image_pool_ops
from datasets.bases import (BACKTRANS_KEY, ImageDataset, ImageTextDataset, ImageTextMLMDataset, TextDataset,
                            noisy_correspondence_index, permute_captions, real_correspondences)
from datasets.check import check_dataset_images
from datasets.cuhkpedes import CUHKPEDES
from datasets.icfgpedes import ICFGPEDES
from datasets.rstpreid import RSTPReid
from datasets.sampler import EpochRandomSampler, RandomIdentitySampler, check_identity_batch
from datasets.sampler_ddp import DistributedRandomSampler, RandomIdentitySampler_DDP
from datasets.synthpedes import SynthPEDES
from datasets.ufine6926 import UFine6926
from methods.registry import get_method
from utils.choices import DATASETS, IMG_AUG_POOL, SAMPLERS, VAL_DATASETS, check_choice
from utils.comm import get_rank, get_world_size, is_main_process

logger = logging.getLogger("IRRA.dataset")

DATASET_REGISTRY = {
    "CUHK-PEDES": CUHKPEDES,
    "ICFG-PEDES": ICFGPEDES,
    "RSTPReid": RSTPReid,
    "SynthPEDES": SynthPEDES,
    "UFine6926": UFine6926,
}
__factory = DATASET_REGISTRY  # the original's name (its users reach it)
assert tuple(DATASET_REGISTRY) == DATASETS, "utils/choices.py:DATASETS must list the registry"

# CLIP's image normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_dataset(name: str, root: str = "./data", verbose: bool = True, anno_file: str = "", **kwargs):
    """Instantiate a registered dataset parser; an unknown name lists the valid ones. ``anno_file``
    (``--anno_file``): an annotation file read instead of the dataset's own ("" = its own)."""
    check_choice("dataset_name", name, DATASET_REGISTRY)
    if anno_file:
        kwargs["anno_file"] = anno_file
    return DATASET_REGISTRY[name](root=root, verbose=verbose, **kwargs)


def build_transforms(img_size: Sequence[int] = (384, 128), aug: bool = False, is_train: bool = True,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                     pad: int = 10, flip_p: float = 0.5, erasing_scale: Tuple[float, float] = (0.02, 0.4),
                     pool: bool = False, pool_ops: int = 2) -> T.Compose:
    """The original's pipelines: eval Resize+ToTensor+Normalize; train adds a flip (and Pad/RandomCrop/Erasing with aug).

    ``pool`` (``--img_aug_pool``, train only) replaces the train pipeline, ``aug`` included, by TBPS-CLIP's: Resize,
    ToTensor, ``pool_ops`` ops drawn per sample from ``datasets/augment.py:image_pool_ops``, Normalize.
    """
    height, width = img_size
    if not is_train:
        return T.Compose([T.Resize((height, width)), T.ToTensor(), T.Normalize(mean=mean, std=std)])
    if pool:
        return T.Compose([
            T.Resize((height, width)),
            T.ToTensor(),
            RandomOpsPool(image_pool_ops((height, width)), pool_ops),
            T.Normalize(mean=mean, std=std),
        ])
    if aug:
        return T.Compose([
            T.Resize((height, width)),
            T.RandomHorizontalFlip(flip_p),
            T.Pad(pad),
            T.RandomCrop((height, width)),
            T.ToTensor(),
            T.Normalize(mean=mean, std=std),
            T.RandomErasing(scale=erasing_scale, value=list(mean)),
        ])
    return T.Compose([
        T.Resize((height, width)),
        T.RandomHorizontalFlip(flip_p),
        T.ToTensor(),
        T.Normalize(mean=mean, std=std),
    ])


def collate(batch: List[Dict]) -> Dict[str, torch.Tensor]:
    """List of sample dicts -> dict of tensors (tensors stacked, ints made a LongTensor)."""
    if not isinstance(batch, (list, tuple)) or not batch or not all(isinstance(b, dict) for b in batch):
        got = type(batch).__name__ if not isinstance(batch, (list, tuple)) else \
            f"[{', '.join(sorted({type(b).__name__ for b in batch}))}]"
        raise TypeError(f"collate expects a non-empty list of dicts (ImageTextDataset samples), got {got}")
    keys = sorted({k for b in batch for k in b})
    out = {}
    for k in keys:
        values = [b.get(k) for b in batch]
        first = values[0]
        if isinstance(first, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in values):
            out[k] = torch.stack(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[k] = torch.tensor(values, dtype=torch.long)
        else:
            types = sorted({type(v).__name__ for v in values})
            raise TypeError(f"collate: unexpected data type {types} for key '{k}'; expected torch.Tensor or int "
                            f"in every sample (an image without a transform is a PIL image)")
    return out


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed numpy and python ``random`` from the worker's torch seed (for third-party transforms
    that draw from them; ours draw from per-sample generators)."""
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def set_train_epoch(loader: DataLoader, epoch: int) -> None:
    """Prepare a train loader of :func:`build_dataloader` for epoch ``epoch``: the sampler's order and the dataset's
    per-sample random draws (see the module docstring)."""
    sampler = getattr(loader, "train_sampler", None)
    if sampler is None:
        raise ValueError("set_train_epoch: this loader has no train_sampler (not built by build_dataloader)")
    sampler.set_epoch(epoch)
    if hasattr(getattr(loader, "dataset", None), "set_epoch"):
        loader.dataset.set_epoch(epoch)


def build_caption_aug(args: argparse.Namespace, dataset
                      ) -> Tuple[Optional[CaptionAugment], Optional[List[Optional[str]]]]:
    """``(caption augmentation, the train rows' back-translations)`` of the ``--txt_aug_*`` options; ``(None, None)``
    when they are off. Back-translation needs ``captions_bt`` in the annotation file (``datasets/bases.py``)."""
    caption_aug = CaptionAugment(args.txt_aug_word_drop_rate, args.txt_aug_word_drop_apply_prob,
                                 args.txt_aug_backtrans_prob)
    if not caption_aug.active:
        return None, None
    captions_bt = None
    if caption_aug.backtrans_prob > 0:
        captions_bt = dataset.train_captions_bt
        n_bt = 0 if captions_bt is None else sum(bt is not None for bt in captions_bt)
        if n_bt == 0:
            raise ValueError(f"--txt_aug_backtrans_prob {args.txt_aug_backtrans_prob}: no train caption of "
                             f"{dataset.anno_path} has a back-translation (entries need a '{BACKTRANS_KEY}' list "
                             f"aligned with 'captions')")
        logger.info("back-translations: %d of %d train captions have one", n_bt, len(captions_bt))
    logger.info("caption augmentation: %s", caption_aug)
    return caption_aug, captions_bt


def build_train_loader(args: argparse.Namespace, dataset, generator: Optional[torch.Generator] = None,
                       rank: Optional[int] = None, world_size: Optional[int] = None) -> DataLoader:
    """The train loader of ``dataset`` (a parsed dataset) for this process; ``loader.train_sampler`` has
    ``set_epoch``. ``rank`` / ``world_size`` default to torch.distributed's; ``args.batch_size`` is the global batch."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    check_choice("sampler", args.sampler, SAMPLERS)
    if not dataset.train:
        raise ValueError(f"{args.dataset_name} under --root_dir {args.root_dir}: the training split is empty "
                         f"(no annotation entry has split == 'train')")
    if args.batch_size % world_size != 0:
        raise ValueError(f"--batch_size {args.batch_size} (the global batch) must be divisible by the number of "
                         f"processes {world_size}")
    if generator is None:
        generator = torch.Generator().manual_seed(args.seed + rank)
    transform = build_transforms(img_size=args.img_size, aug=args.img_aug, is_train=True, pool=args.img_aug_pool,
                                 pool_ops=args.img_aug_pool_ops)
    if args.img_aug_pool:
        logger.info("image augmentation pool: %d of %s per sample%s", args.img_aug_pool_ops, list(IMG_AUG_POOL),
                    " (replaces --img_aug's pipeline)" if args.img_aug else "")
    caption_aug, captions_bt = build_caption_aug(args, dataset)
    train_rows, real = dataset.train, None
    if args.noisy_rate > 0:  # RDE's simulated noisy correspondences (the parsed dataset is left as it is)
        noisy_index = noisy_correspondence_index(len(train_rows), args.noisy_rate, args.noisy_file or None, args.seed)
        train_rows = permute_captions(train_rows, noisy_index)
        if captions_bt is not None:
            captions_bt = [captions_bt[int(j)] for j in noisy_index]
        real = real_correspondences(noisy_index, args.noisy_rate)
    train_set = get_method(args.method).build_train_set(args, train_rows, transform, caption_aug, captions_bt)
    if train_set is not None:
        pass
    elif args.MLM:
        train_set = ImageTextMLMDataset(
            train_rows, transform, text_length=args.text_length, seed=args.seed,
            mlm_probability=args.mlm_probability, masked_token_rate=args.masked_token_rate,
            masked_token_unchanged_rate=args.masked_token_unchanged_rate, mlm_mask_caption=args.mlm_mask_caption,
            caption_aug=caption_aug, captions_bt=captions_bt)
    else:
        train_set = ImageTextDataset(train_rows, transform, text_length=args.text_length, seed=args.seed,
                                     caption_aug=caption_aug, captions_bt=captions_bt)
    train_set.real_correspondences = real
    train_set.token_aug = bool(args.txt_aug)
    train_set.with_index = get_method(args.method).sample_index  # the method's hooks look samples up by index

    common = dict(num_workers=args.num_workers, collate_fn=collate, worker_init_fn=seed_worker, generator=generator,
                  pin_memory=torch.accelerator.is_available())  # page-locked batches for the async copy to a GPU
    per_rank = args.batch_size // world_size
    if args.sampler == "identity":
        check_identity_batch(args.batch_size, args.num_instance, world_size)
        if world_size > 1:
            sampler = RandomIdentitySampler_DDP(dataset.train, args.batch_size, args.num_instance,
                                                rank=rank, world_size=world_size, seed=args.seed)
            loader = DataLoader(train_set, batch_sampler=BatchSampler(sampler, per_rank, drop_last=True), **common)
        else:
            sampler = RandomIdentitySampler(dataset.train, args.batch_size, args.num_instance, seed=args.seed)
            loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, **common)
        logger.info("using identity sampler: %d ids x %d instances per batch%s", args.batch_size // args.num_instance,
                    args.num_instance, f" over {world_size} ranks" if world_size > 1 else "")
    else:
        if world_size > 1:
            sampler = DistributedRandomSampler(train_set, args.batch_size, rank=rank, world_size=world_size,
                                               seed=args.seed)
            loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=True, **common)
        else:
            sampler = EpochRandomSampler(train_set, seed=args.seed)
            loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, **common)
        logger.info("using random sampler%s", f" (global batches sliced over {world_size} ranks)"
                    if world_size > 1 else "")
    sampler.attach_loader_generator(generator, args.seed + rank)
    loader.train_sampler = sampler
    return loader


def build_eval_loaders(args: argparse.Namespace, split: Dict[str, list], split_name: str,
                       transform: Optional[Callable] = None) -> Tuple[DataLoader, DataLoader]:
    """``(image loader, text loader)`` over an evaluation split dict (``img_paths``, ``image_pids``, ``captions``,
    ``caption_pids``); ``transform`` defaults to the test transform."""
    if not split["img_paths"] or not split["captions"]:
        counts = f"({len(split['img_paths'])} images, {len(split['captions'])} captions)"
        if not args.training:  # test.py: it evaluates the test split and has no --val_dataset
            raise ValueError(f"{args.dataset_name} under --root_dir {args.root_dir} has no {split_name} split "
                             f"{counts}: test.py evaluates the annotation's '{split_name}' entries")
        other = "test" if split_name == "val" else "val"
        raise ValueError(f"--val_dataset {split_name}: {args.dataset_name} has no {split_name} split "
                         f"{counts}; use --val_dataset {other}")
    method = get_method(args.method)
    transform = transform if transform is not None else method.test_transform(args)
    img_set = ImageDataset(split["image_pids"], split["img_paths"], transform)
    txt_set = TextDataset(split["caption_pids"], split["captions"], text_length=args.text_length,
                          tokenize_fn=method.caption_tokenizer(args), split=split_name)
    img_loader = DataLoader(img_set, batch_size=args.test_batch_size, shuffle=False, num_workers=args.num_workers)
    txt_loader = DataLoader(txt_set, batch_size=args.test_batch_size, shuffle=False, num_workers=args.num_workers)
    return img_loader, txt_loader


def build_dataloader(args: argparse.Namespace, tranforms: Optional[Callable] = None,
                     generator: Optional[torch.Generator] = None, dataset=None):
    """Build the loaders as the original.

    Training (``args.training``): ``(train_loader, val_img_loader, val_txt_loader, num_classes)`` where the val
    loaders use ``args.val_dataset`` ('val' or 'test'). Test mode: ``(test_img_loader, test_txt_loader, num_classes)``.
    ``tranforms`` (sic, the original's name) overrides the eval transform; ``generator`` the train loader's generator
    (default: seeded with ``args.seed + rank``); ``dataset`` a pre-built parser object.

    Before any loader is built, every image of the splits used (training: train and ``args.val_dataset``; test mode:
    test) is opened once (``datasets.check.check_dataset_images``, cached by size and mtime in
    ``<dataset_dir>/.irra_image_check``): a missing, empty or unreadable file raises ``ImageCheckError`` naming
    every such file, unless ``args.skip_image_check``; the datasets still check that every file exists and is not
    empty (``datasets.check.check_image_files``, ``ImageFilesMissingError``).
    """
    if dataset is None:
        dataset = build_dataset(args.dataset_name, root=args.root_dir, anno_file=args.anno_file)
    num_classes = len(dataset.train_id_container)
    if args.training:
        check_choice("val_dataset", args.val_dataset, VAL_DATASETS)
    if not args.skip_image_check:
        # every image of the splits used, opened once before any loader (cached by size and mtime)
        check_dataset_images(dataset, splits=("train", args.val_dataset) if args.training else ("test",),
                             show_progress=is_main_process())
    if not args.training:
        return (*build_eval_loaders(args, dataset.test, "test", tranforms), num_classes)
    val_split = dataset.val if args.val_dataset == "val" else dataset.test
    val_img_loader, val_txt_loader = build_eval_loaders(args, val_split, args.val_dataset, tranforms)
    train_loader = build_train_loader(args, dataset, generator)
    return train_loader, val_img_loader, val_txt_loader, num_classes
