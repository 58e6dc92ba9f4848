"""TBPS-CLIP under DDP equals one process (global negatives): 2 gloo ranks on the CPU, each with half of the fixture
batch, against one process on the whole batch: the global losses and every gradient (after DDP's averaging; the
learned logit scale's included) are one process's. TBPS's own code cannot run in one process (its
``is_using_distributed()`` is always True)."""
import os
import socket

import torch
import torch.multiprocessing as mp

from tests import tbps_ddp_worker as W

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(W.worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    batch = W.global_batch()
    one = W.run(W.build(), batch)
    for k, v in one["losses"].items():  # (temperature too)
        if k == "id_loss":  # each rank's own samples; the mean over ranks is the global mean
            got = sum(r["losses"][k] for r in ranks) / WORLD
        else:
            got = ranks[0]["losses"][k]
            torch.testing.assert_close(ranks[1]["losses"][k], got)
        torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-6, msg=k)
    assert set(ranks[0]["grads"]) == set(one["grads"]) and "logit_scale" in one["grads"]
    for name, g in one["grads"].items():
        scale = float(g.abs().max()) + 1e-12
        for r in ranks:
            diff = float((r["grads"][name] - g).abs().max())
            assert diff <= 1e-4 * scale + 1e-7, (name, diff, scale)
