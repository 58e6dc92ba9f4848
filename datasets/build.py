"""Dataset registry, transforms, collate and the dataloaders.

Epochs and reproducibility (for the trainer):
- the train DataLoader gets ``generator`` (default ``torch.Generator().manual_seed(args.seed + rank)``) and
  ``worker_init_fn=seed_worker``;
- every train sampler has ``set_epoch(epoch)``: ``train_loader.train_sampler`` is it, also reachable as
  ``loader.sampler`` (single process, or DistributedSampler) or ``loader.batch_sampler.sampler`` (DDP identity).
  Samplers: identity -> RandomIdentitySampler / RandomIdentitySampler_DDP; random -> EpochRandomSampler /
  DistributedRandomSampler (torch's DistributedSampler);
- ``set_epoch(e)`` fixes the order of epoch ``e`` (seed + e) and re-seeds the loader generator with ``seed + rank + e``
  (that generator draws the workers' base seed), so a resumed run repeats an uninterrupted one. Without set_epoch
  calls the samplers advance one epoch per iteration. MLM masking and flips use python ``random`` / torch RNG: in
  workers they are seeded from that base seed; with ``num_workers=0`` the trainer's per-epoch seeding drives them.
- ``set_train_epoch(loader, epoch)`` is a helper that finds the sampler and calls ``set_epoch``.
"""
from __future__ import annotations

import argparse
import logging
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms as T
from torch.utils.data import BatchSampler, DataLoader

from datasets.bases import ImageDataset, ImageTextDataset, ImageTextMLMDataset, TextDataset
from datasets.cuhkpedes import CUHKPEDES
from datasets.icfgpedes import ICFGPEDES
from datasets.rstpreid import RSTPReid
from datasets.sampler import EpochRandomSampler, RandomIdentitySampler, check_identity_batch
from datasets.sampler_ddp import DistributedRandomSampler, RandomIdentitySampler_DDP
from datasets.synthpedes import SynthPEDES

logger = logging.getLogger("IRRA.dataset")

DATASET_REGISTRY = {
    "CUHK-PEDES": CUHKPEDES,
    "ICFG-PEDES": ICFGPEDES,
    "RSTPReid": RSTPReid,
    "SynthPEDES": SynthPEDES,
}
__factory = DATASET_REGISTRY  # the original's name

SAMPLERS = ("identity", "random")
VAL_DATASETS = ("val", "test")

# CLIP's image normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_dataset(name: str, root: str = "./data", verbose: bool = True, **kwargs):
    """Instantiate a registered dataset parser; an unknown name lists the valid ones."""
    if name not in DATASET_REGISTRY:
        raise ValueError(f"Unknown dataset_name '{name}'; valid: {sorted(DATASET_REGISTRY)}")
    return DATASET_REGISTRY[name](root=root, verbose=verbose, **kwargs)


def build_transforms(img_size: Sequence[int] = (384, 128), aug: bool = False, is_train: bool = True,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                     pad: int = 10, flip_p: float = 0.5, erasing_scale: Tuple[float, float] = (0.02, 0.4)) -> T.Compose:
    """The original's pipelines: eval Resize+ToTensor+Normalize; train adds a flip (and Pad/RandomCrop/Erasing with aug)."""
    height, width = img_size
    if not is_train:
        return T.Compose([T.Resize((height, width)), T.ToTensor(), T.Normalize(mean=mean, std=std)])
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
    """worker_init_fn: seed numpy and python ``random`` from the worker's torch seed (set from the generator)."""
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def _dist_info() -> Tuple[bool, int, int]:
    try:
        from utils.comm import get_rank, get_world_size
        world, rank = get_world_size(), get_rank()
    except ImportError:  # pragma: no cover - utils/comm.py is the LEAD's
        initialized = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialized else 1
        rank = dist.get_rank() if initialized else 0
    return world > 1, rank, world


def get_train_sampler(loader: DataLoader):
    """The sampler of a train loader that has ``set_epoch`` (or None)."""
    return getattr(loader, "train_sampler", None)


def set_train_epoch(loader: DataLoader, epoch: int) -> None:
    """Prepare a train loader for epoch ``epoch`` (sampler order + loader generator), see the module docstring."""
    sampler = get_train_sampler(loader)
    if sampler is None:
        raise ValueError("set_train_epoch: this loader has no train_sampler (not built by build_dataloader)")
    sampler.set_epoch(epoch)


def build_dataloader(args: argparse.Namespace, tranforms: Optional[Callable] = None,
                     generator: Optional[torch.Generator] = None, dataset=None):
    """Build the loaders as the original.

    Training (``args.training``): ``(train_loader, val_img_loader, val_txt_loader, num_classes)`` where the val
    loaders use ``args.val_dataset`` ('val' or 'test'). Test mode: ``(test_img_loader, test_txt_loader, num_classes)``.
    ``tranforms`` (sic, the original's name) overrides the eval transform; ``generator`` the train loader's generator
    (default: seeded with ``args.seed``); ``dataset`` a pre-built parser object.
    """
    if dataset is None:
        dataset = build_dataset(args.dataset_name, root=args.root_dir)
    num_classes = len(dataset.train_id_container)
    num_workers = args.num_workers
    text_length = args.text_length
    val_transforms = tranforms if tranforms is not None else build_transforms(img_size=args.img_size, is_train=False)

    if not args.training:
        test_img_set = ImageDataset(dataset.test["image_pids"], dataset.test["img_paths"], val_transforms)
        test_txt_set = TextDataset(dataset.test["caption_pids"], dataset.test["captions"], text_length=text_length)
        test_img_loader = DataLoader(test_img_set, batch_size=args.test_batch_size, shuffle=False,
                                     num_workers=num_workers)
        test_txt_loader = DataLoader(test_txt_set, batch_size=args.test_batch_size, shuffle=False,
                                     num_workers=num_workers)
        return test_img_loader, test_txt_loader, num_classes

    if args.sampler not in SAMPLERS:
        raise ValueError(f"Unknown --sampler '{args.sampler}'; valid: {list(SAMPLERS)}")
    if args.val_dataset not in VAL_DATASETS:
        raise ValueError(f"Unknown --val_dataset '{args.val_dataset}'; valid: {list(VAL_DATASETS)}")
    if not dataset.train:
        raise ValueError(f"{args.dataset_name} under --root_dir {args.root_dir}: the training split is empty "
                         f"(no annotation entry has split == 'train')")
    distributed, rank, world_size = _dist_info()
    seed = int(getattr(args, "seed", 1) or 0)
    if generator is None:
        generator = torch.Generator().manual_seed(seed + rank)

    train_transforms = build_transforms(img_size=args.img_size, aug=args.img_aug, is_train=True)
    if args.MLM:
        train_set = ImageTextMLMDataset(
            dataset.train, train_transforms, text_length=text_length,
            mlm_probability=getattr(args, "mlm_probability", 0.15),
            masked_token_rate=getattr(args, "masked_token_rate", 0.8),
            masked_token_unchanged_rate=getattr(args, "masked_token_unchanged_rate", 0.1),
            mlm_mask_caption=getattr(args, "mlm_mask_caption", False))
    else:
        train_set = ImageTextDataset(dataset.train, train_transforms, text_length=text_length)

    common = dict(num_workers=num_workers, collate_fn=collate, worker_init_fn=seed_worker, generator=generator,
                  pin_memory=torch.accelerator.is_available())  # page-locked batches for the async copy to a GPU
    if args.sampler == "identity":
        check_identity_batch(args.batch_size, args.num_instance, world_size)
        if distributed:
            mini_batch_size = args.batch_size // world_size
            train_sampler = RandomIdentitySampler_DDP(dataset.train, args.batch_size, args.num_instance,
                                                      rank=rank, world_size=world_size, seed=seed)
            batch_sampler = BatchSampler(train_sampler, mini_batch_size, drop_last=True)
            train_loader = DataLoader(train_set, batch_sampler=batch_sampler, **common)
        else:
            train_sampler = RandomIdentitySampler(dataset.train, args.batch_size, args.num_instance, seed=seed)
            train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, **common)
        logger.info("using identity sampler: %d ids x %d instances per batch%s", args.batch_size // args.num_instance,
                    args.num_instance, f" over {world_size} ranks" if distributed else "")
    else:
        if distributed:
            if args.batch_size % world_size != 0:
                raise ValueError(f"--batch_size {args.batch_size} must be divisible by the world size {world_size}")
            train_sampler = DistributedRandomSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                                     seed=seed, drop_last=True)
            train_loader = DataLoader(train_set, batch_size=args.batch_size // world_size, sampler=train_sampler,
                                      drop_last=True, **common)
        else:
            train_sampler = EpochRandomSampler(train_set, seed=seed)
            train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, **common)
        logger.info("using random sampler%s", f" (DistributedSampler over {world_size} ranks)" if distributed else "")
    train_sampler.attach_loader_generator(generator, seed + rank)
    train_loader.train_sampler = train_sampler

    ds = dataset.val if args.val_dataset == "val" else dataset.test
    if not ds["img_paths"] or not ds["captions"]:
        raise ValueError(f"--val_dataset {args.val_dataset}: {args.dataset_name} has no {args.val_dataset} split "
                         f"({len(ds['img_paths'])} images, {len(ds['captions'])} captions); use --val_dataset "
                         f"{'test' if args.val_dataset == 'val' else 'val'}")
    val_img_set = ImageDataset(ds["image_pids"], ds["img_paths"], val_transforms)
    val_txt_set = TextDataset(ds["caption_pids"], ds["captions"], text_length=text_length)
    val_img_loader = DataLoader(val_img_set, batch_size=args.test_batch_size, shuffle=False, num_workers=num_workers)
    val_txt_loader = DataLoader(val_txt_set, batch_size=args.test_batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, val_img_loader, val_txt_loader, num_classes
