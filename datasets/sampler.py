"""Identity sampler: every batch holds N = batch_size // K identities x K instances (fast-reid / reid-strong-baseline).

Each epoch draws its order from ``random.Random(seed + epoch)``: ``seed`` defaults to a draw from the global
``random`` module at construction (so seeding ``random`` before building the loader makes runs reproducible), and the
epoch is set with ``set_epoch(epoch)`` (resume) or, when an iteration starts without a ``set_epoch`` call since the
previous one, advances by one. ``len()`` is the length of the current (last started or set) epoch.

All train samplers here share ``EpochSeeded``: ``attach_loader_generator(generator, seed)`` makes ``set_epoch(e)``
also re-seed the DataLoader's generator with ``seed + e`` (it draws the workers' base seed), so epoch ``e`` of a
resumed run sees the same order and worker seeds as an uninterrupted run. The flips, crops, erasing and MLM masks do
not depend on the workers: they come from per-sample seeds (``datasets/bases.py:sample_seed``).
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data.sampler import Sampler


class EpochSeeded:
    """``set_epoch`` support: the epoch used for the next iteration + optional DataLoader generator re-seeding."""

    epoch: int = 0
    loader_generator: Optional[torch.Generator] = None
    loader_seed: int = 0
    _iterated: bool = False  # an iteration started since the last set_epoch

    def attach_loader_generator(self, generator: Optional[torch.Generator], seed: int) -> None:
        """Re-seed ``generator`` with ``seed + epoch`` on every ``set_epoch(epoch)``."""
        self.loader_generator = generator
        self.loader_seed = int(seed)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use epoch ``epoch``'s order (and re-seed the attached generator)."""
        self.epoch = int(epoch)
        self._iterated = False
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(self.loader_seed + self.epoch)

    def _begin_epoch(self) -> int:
        """Epoch for an iteration that starts now: the set one, or the previous one + 1."""
        if self._iterated:
            self.epoch += 1
        self._iterated = True
        return self.epoch


class EpochRandomSampler(EpochSeeded, Sampler):
    """Random permutation per epoch from ``torch.Generator().manual_seed(seed + epoch)`` (single process)."""

    def __init__(self, data_source: Sequence, seed: int = 0) -> None:
        self.data_source = data_source
        self.seed = int(seed)
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self._begin_epoch())
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())

    def __len__(self) -> int:
        return len(self.data_source)


def check_identity_batch(batch_size: int, num_instances: int, world_size: int = 1) -> None:
    """Raise a clear ValueError unless the batch splits into whole identities (per rank)."""
    if num_instances < 1:
        raise ValueError(f"--num_instance must be >= 1, got {num_instances}")
    if batch_size < 1 or batch_size % (num_instances * world_size) != 0:
        per = f"num_instance ({num_instances})" + (f" x world size ({world_size})" if world_size > 1 else "")
        raise ValueError(f"--batch_size {batch_size} must be a positive multiple of {per} for the identity sampler")


def build_pid_index(data_source: Sequence) -> Dict[int, List[int]]:
    """pid -> dataset indices; rows are ``(pid, image_id, img_path, caption)``."""
    index_dic: Dict[int, List[int]] = defaultdict(list)
    for index, row in enumerate(data_source):
        index_dic[row[0]].append(index)
    return index_dic


def identity_batches(index_dic: Dict[int, List[int]], num_pids_per_batch: int, num_instances: int,
                     rng: random.Random) -> List[List[int]]:
    """One epoch of batches, each ``num_pids_per_batch`` distinct pids x ``num_instances`` indices.

    Per pid its indices are shuffled and cut into chunks of K (ids with fewer than K images are sampled with
    replacement up to K, leftovers dropped); random pids then emit their next chunk until fewer than N pids remain.
    """
    chunks: Dict[int, List[List[int]]] = {}
    for pid in sorted(index_dic):
        idxs = list(index_dic[pid])
        if len(idxs) < num_instances:
            idxs = [rng.choice(idxs) for _ in range(num_instances)]
        rng.shuffle(idxs)
        chunks[pid] = [idxs[i:i + num_instances] for i in range(0, len(idxs) - num_instances + 1, num_instances)]
    avai_pids = sorted(chunks)
    batches = []
    while len(avai_pids) >= num_pids_per_batch:
        selected = rng.sample(avai_pids, num_pids_per_batch)
        batch = []
        for pid in selected:
            batch.extend(chunks[pid].pop(0))
            if not chunks[pid]:
                avai_pids.remove(pid)
        batches.append(batch)
    return batches


class RandomIdentitySampler(EpochSeeded, Sampler):
    """Yields dataset indices, ``batch_size`` at a time: N ids x K instances (use with DataLoader(batch_size=...)).

    Args:
        data_source: train rows ``(pid, image_id, img_path, caption)``.
        batch_size: images per batch, a multiple of ``num_instances``.
        num_instances: K, instances per identity in a batch.
        seed: base seed; ``None`` draws one from the global ``random`` state.
    """

    def __init__(self, data_source: Sequence, batch_size: int, num_instances: int,
                 seed: Optional[int] = None) -> None:
        check_identity_batch(batch_size, num_instances)
        self.data_source = data_source
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.index_dic = build_pid_index(data_source)
        self.pids = sorted(self.index_dic)
        if len(self.pids) < self.num_pids_per_batch:
            raise ValueError(f"identity sampler: batch_size {batch_size} / num_instance {num_instances} needs "
                             f"{self.num_pids_per_batch} identities per batch but the train set has {len(self.pids)}")
        self.seed = random.getrandbits(31) if seed is None else int(seed)
        self.epoch = 0
        self._cache: Optional[tuple] = None

    def _batches(self) -> List[List[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            rng = random.Random(self.seed + self.epoch)
            self._cache = (self.epoch, identity_batches(self.index_dic, self.num_pids_per_batch,
                                                        self.num_instances, rng))
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        self._begin_epoch()
        return iter([i for batch in self._batches() for i in batch])

    def __len__(self) -> int:
        return len(self._batches()) * self.batch_size
