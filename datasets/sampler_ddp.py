"""Distributed samplers: the one-process batches, sliced over the ranks.

Identity sampler: each rank gets the same number of batches of disjoint indices.

All ranks build the same global epoch (``identity_batches`` with ``random.Random(seed + epoch)``); every global batch
of ``batch_size`` = N ids x K is cut into ``world_size`` consecutive slices of ``batch_size // world_size`` (whole
identities, as batch_size is a multiple of K x world_size) and rank r takes slice r. Within an epoch each dataset
index lands in at most one K-chunk, so ranks never share indices. Wrap it with
``BatchSampler(sampler, batch_size // world_size, drop_last=True)``. Call ``set_epoch(epoch)`` for a new shuffle (it
also advances by itself when iterated again without a ``set_epoch`` call, see datasets/sampler.py).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from datasets.sampler import EpochSeeded, RandomIdentitySampler, check_identity_batch


class DistributedRandomSampler(EpochSeeded, Sampler):
    """The one-process random order, cut into global batches of ``batch_size``; rank r yields its consecutive slice
    of ``batch_size // world_size`` indices of each. The ranks together see exactly the batches of
    ``EpochRandomSampler(seed)`` (same permutation of ``seed + epoch``), except the last incomplete one, which is
    dropped so that every rank gets the same number of batches. Use with ``DataLoader(batch_size=batch_size //
    world_size, drop_last=True)``."""

    def __init__(self, data_source: Sequence, batch_size: int, rank: int, world_size: int, seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if batch_size % world_size != 0:
            raise ValueError(f"--batch_size {batch_size} must be divisible by the world size {world_size}")
        self.data_source = data_source
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.mini_batch_size = batch_size // world_size
        self.seed = int(seed)
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self._begin_epoch())
        perm = torch.randperm(len(self.data_source), generator=g).tolist()  # = EpochRandomSampler's order
        lo = self.rank * self.mini_batch_size
        out: List[int] = []
        for start in range(0, len(perm) - self.batch_size + 1, self.batch_size):
            out += perm[start + lo:start + lo + self.mini_batch_size]
        return iter(out)

    def __len__(self) -> int:
        return (len(self.data_source) // self.batch_size) * self.mini_batch_size


class RandomIdentitySampler_DDP(RandomIdentitySampler):
    """Yields this rank's indices (``batch_size // world_size`` per batch, N/world ids x K instances)."""

    def __init__(self, data_source: Sequence, batch_size: int, num_instances: int, rank: Optional[int] = None,
                 world_size: Optional[int] = None, seed: int = 0) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        check_identity_batch(batch_size, num_instances, world_size)
        super().__init__(data_source, batch_size, num_instances, seed=seed)
        self.rank = rank
        self.world_size = world_size
        self.mini_batch_size = batch_size // world_size

    def _batches(self) -> List[List[int]]:
        """This rank's slice of every global batch (the global epoch is the same on every rank)."""
        lo = self.rank * self.mini_batch_size
        return [b[lo:lo + self.mini_batch_size] for b in super()._batches()]

    def __len__(self) -> int:
        return len(self._batches()) * self.mini_batch_size
