"""Identity sampler (N ids x K), its DDP version (disjoint, equal shards for world sizes 1-4), random samplers."""
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import BatchSampler

from datasets.sampler import EpochRandomSampler, RandomIdentitySampler
from datasets.sampler_ddp import DistributedRandomSampler, RandomIdentitySampler_DDP


def rows(counts):
    """Train rows (pid, image_id, path, caption); ``counts[pid]`` rows per pid, interleaved order."""
    out = []
    rng = random.Random(0)
    for pid, n in enumerate(counts):
        out += [(pid, len(out) + j, f"{pid}_{j}.png", "c") for j in range(n)]
    rng.shuffle(out)
    return out


COUNTS = [rng_n for rng_n in (8, 3, 5, 12, 4, 1, 6, 9, 2, 7, 4, 4, 10, 5, 8, 3)] * 4  # 64 ids, some < K


def test_identity_batches_are_n_ids_by_k():
    data = rows(COUNTS)
    K, B = 4, 16
    s = RandomIdentitySampler(data, B, K, seed=1)
    idx = list(s)
    assert len(idx) == len(s) and len(idx) % B == 0 and len(idx) > 0
    seen = Counter()
    for b in range(0, len(idx), B):
        batch = idx[b:b + B]
        pids = [data[i][0] for i in batch]
        groups = [pids[g:g + K] for g in range(0, B, K)]
        assert all(len(set(g)) == 1 for g in groups)          # K instances of one id
        assert len({g[0] for g in groups}) == B // K          # N distinct ids
        for g in range(0, B, K):
            chunk = batch[g:g + K]
            n_avail = COUNTS[data[chunk[0]][0]]
            if n_avail >= K:
                assert len(set(chunk)) == K  # without replacement when the id has enough rows
                seen.update(chunk)
            else:
                assert set(chunk) <= {i for i, r in enumerate(data) if r[0] == data[chunk[0]][0]}
    assert max(seen.values()) == 1  # each row at most once per epoch (ids with >= K rows)
    # ids with fewer than K rows are sampled with replacement
    small = [p for p, n in enumerate(COUNTS) if n < K]
    assert any(data[i][0] in small for i in idx)


def test_identity_epochs_deterministic_and_different():
    data = rows(COUNTS)
    a = RandomIdentitySampler(data, 8, 2, seed=7)
    e0, e1 = list(a), list(a)  # advances by itself
    assert e0 != e1
    b = RandomIdentitySampler(data, 8, 2, seed=7)
    b.set_epoch(1)
    assert list(b) == e1
    b.set_epoch(0)
    assert list(b) == e0
    random.seed(3)
    c = RandomIdentitySampler(data, 8, 2)  # seed drawn from the global random state
    random.seed(3)
    d = RandomIdentitySampler(data, 8, 2)
    assert list(c) == list(d)


def test_identity_bad_batch_sizes():
    data = rows(COUNTS)
    with pytest.raises(ValueError, match=r"--batch_size 10 must be a positive multiple of num_instance \(4\)"):
        RandomIdentitySampler(data, 10, 4)
    with pytest.raises(ValueError, match=r"needs 8 identities per batch but the train set has 3"):
        RandomIdentitySampler(rows([4, 4, 4]), 32, 4)
    with pytest.raises(ValueError, match=r"multiple of num_instance \(4\) x world size \(3\)"):
        RandomIdentitySampler_DDP(data, 16, 4, rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"rank 4 out of range for world size 4"):
        RandomIdentitySampler_DDP(data, 16, 4, rank=4, world_size=4)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_identity_ddp_shards_disjoint_equal(world):
    data = rows(COUNTS)
    K = 2
    B = K * 2 * world  # 2 ids per rank per step
    single = RandomIdentitySampler(data, B, K, seed=5)
    shards = []
    for rank in range(world):
        s = RandomIdentitySampler_DDP(data, B, K, rank=rank, world_size=world, seed=5)
        bs = BatchSampler(s, B // world, drop_last=True)
        batches = list(bs)
        assert len(batches) == len(bs) and len(s) == len(batches) * (B // world)
        for batch in batches:
            pids = [data[i][0] for i in batch]
            assert len(batch) == B // world
            assert all(len(set(pids[g:g + K])) == 1 for g in range(0, len(pids), K))
        shards.append(batches)
    assert len({len(b) for b in shards}) == 1  # same number of batches on every rank
    sets = [set(i for b in sh for i in b) for sh in shards]
    for a in range(world):
        for b in range(a + 1, world):
            assert not sets[a] & sets[b]
    # the ranks' step-t batches together form the single-process global batch t (same seed/epoch)
    merged = [i for t in range(len(shards[0])) for r in range(world) for i in shards[r][t]]
    assert merged == list(single)


def test_identity_ddp_new_shuffle_per_epoch():
    data = rows(COUNTS)
    s = RandomIdentitySampler_DDP(data, 8, 2, rank=1, world_size=2, seed=0)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and len(e0) == len(s)
    s.set_epoch(0)
    assert list(s) == e0


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_random_sampler_slices_the_one_process_batches(world):
    """Rank r yields slice r of every full global batch of EpochRandomSampler's order (the last partial one dropped)."""
    n, batch = 50, 12
    one = EpochRandomSampler(list(range(n)), seed=2)
    one.set_epoch(3)
    order = list(one)
    expected = [order[b:b + batch] for b in range(0, n - batch + 1, batch)]  # full global batches
    gen = torch.Generator()
    per_rank = []
    for rank in range(world):
        s = DistributedRandomSampler(list(range(n)), batch, rank=rank, world_size=world, seed=2)
        s.attach_loader_generator(gen, 10)
        s.set_epoch(3)
        per_rank.append(list(s))
        assert len(s) == len(per_rank[-1]) == (n // batch) * (batch // world)
    per = batch // world
    for b, glob in enumerate(expected):
        assert sum((p[b * per:(b + 1) * per] for p in per_rank), []) == glob
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(13).get_state())
    s.set_epoch(4)
    assert list(s) != per_rank[-1]
    with pytest.raises(ValueError, match="must be divisible by the world size 5"):
        DistributedRandomSampler(list(range(n)), batch, rank=0, world_size=5)


def test_epoch_random_sampler():
    s = EpochRandomSampler(list(range(30)), seed=4)
    e0, e1 = list(s), list(s)
    assert sorted(e0) == list(range(30)) and e0 != e1
    s.set_epoch(0)
    assert list(s) == e0 == torch.randperm(30, generator=torch.Generator().manual_seed(4)).tolist()


# ---------------------------------------------------------------------------------------------- batches per epoch
def _chunks_available(counts, k):
    """Chunks of K rows each id offers in an epoch (an id with fewer than K rows offers one, with replacement)."""
    return {pid: max(n, k) // k for pid, n in enumerate(counts)}


@pytest.mark.parametrize("world", [1, 2])
def test_identity_epoch_yields_every_full_batch(world):
    """Iterate the loaders as datasets/build.py builds them and count the batches an epoch yields: every batch is
    full, their number is what len() promises, and the epoch stops only when fewer than N ids have a chunk left
    (a sampler that drops its last batch leaves N ids with chunks)."""
    data, K, B = rows(COUNTS), 4, 16
    n_ids_per_batch = B // K
    per_rank = B // world
    loaders, samplers = [], []
    for r in range(world):
        if world == 1:
            s = RandomIdentitySampler(data, B, K, seed=5)
            loaders.append(torch.utils.data.DataLoader(range(len(data)), batch_size=B, sampler=s))
        else:
            s = RandomIdentitySampler_DDP(data, B, K, rank=r, world_size=world, seed=5)
            loaders.append(torch.utils.data.DataLoader(range(len(data)), batch_sampler=BatchSampler(s, per_rank,
                                                                                                   drop_last=True)))
        samplers.append(s)
    for epoch in (0, 3):
        used = Counter()
        per_loader = []
        for loader, s in zip(loaders, samplers):
            s.set_epoch(epoch)
            batches = [b.tolist() for b in loader]
            per_loader.append(batches)
            assert len(batches) == len(loader) > 0
            assert all(len(b) == per_rank for b in batches)
        assert len({len(b) for b in per_loader}) == 1  # every rank steps the same number of times
        for g in range(len(per_loader[0])):  # the global batch g: the ranks' slices joined
            batch = [i for rank_batches in per_loader for i in rank_batches[g]]
            for c in range(0, B, K):
                used[data[batch[c]][0]] += 1
        left = [pid for pid, n in _chunks_available(COUNTS, K).items() if n - used[pid] > 0]
        assert len(left) < n_ids_per_batch, f"{len(left)} ids still hold a chunk at the epoch's end: a batch was dropped"
        assert sum(used.values()) * K == len(per_loader[0]) * B


def test_random_epoch_yields_ceil_n_over_b_batches():
    """Single process: every row once per epoch, ceil(n / B) batches (the last one partial); DDP: the full global
    batches only (n // B), sliced equally over the ranks."""
    data = list(range(50))
    B = 8
    s = EpochRandomSampler(data, seed=2)
    loader = torch.utils.data.DataLoader(data, batch_size=B, sampler=s)
    batches = [b.tolist() for b in loader]
    assert len(batches) == -(-len(data) // B) == 7
    assert sorted(i for b in batches for i in b) == data
    for world in (2, 4):
        counts = []
        for r in range(world):
            d = DistributedRandomSampler(data, B, rank=r, world_size=world, seed=2)
            dl = torch.utils.data.DataLoader(data, batch_size=B // world, sampler=d, drop_last=True)
            got = [b.tolist() for b in dl]
            assert all(len(b) == B // world for b in got)
            counts.append(len(got))
        assert counts == [len(data) // B] * world
