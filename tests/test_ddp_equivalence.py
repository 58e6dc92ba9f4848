"""Multi-process training equals one process: 2 gloo ranks on the CPU against one process on the whole batch.

(1) One optimizer step on a fixed global batch (tests/ddp_step_worker.py): every loss term, every gradient and every
    parameter after the AdamW step equal one process's, for sdm, itc, cmpm, id and mlm, and RDE's tal in eval mode
    and in train mode (its TSE BatchNorm layers, GlobalBatchNorm1d, normalise over the global batch: the running
    statistics after the step equal one process's too); RDE's CCD per-sample losses are gathered so that every rank
    holds one process's; ``--local_negatives`` gives each rank the losses of its slice alone (the original's per-GPU
    behaviour) instead. GlobalBatchNorm1d alone against nn.BatchNorm1d on the whole batch, uneven rows per rank.
(2) ``torchrun --nproc_per_node 2 train.py`` for 2 epochs against ``train.main`` in one process: same parameters in
    ``last.pth`` and same ``metrics.jsonl``, to float noise.
"""
import copy
import glob
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import train
from benchmarks.compare_runs import split_key_biases
from tests import ddp_step_worker as W
from tests.conftest import tiny_train_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
PARAM_ATOL = 1e-5  # fp32, one step / two epochs
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4  # relative to the largest gradient of the tensor (summation order differs)
BUFFER_RTOL = 1e-5  # BatchNorm running statistics, relative to the tensor's largest value
# The biases of the linear layers right before a BatchNorm (RDE's TSE MLPs): the normalisation removes them, so their
# gradient is zero but for float noise (~1e-8), which is compared to this absolute tolerance instead.
PRE_BN_BIAS = "mlp.layers.0.bias"
PRE_BN_BIAS_GRAD_ATOL = 1e-6
JOIN_TIMEOUT_S = 300
RANK_MEAN_KEYS = ("id_loss", "img_acc", "txt_acc")  # per-rank means by design: their rank average is the global one


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_close_dict(got: dict, want: dict, atol: float, what: str, scale_rtol: float = 0.0) -> float:
    """Every tensor of ``got`` within ``atol + scale_rtol * max|want tensor|`` of ``want`` (element-wise); returns
    the largest difference, relative to the tensor's largest magnitude when ``scale_rtol`` is given."""
    assert got.keys() == want.keys(), what
    worst = 0.0
    for name, w in want.items():
        if not w.numel():
            continue
        scale = float(w.abs().max())
        diff = float((got[name] - w).abs().max())
        worst = max(worst, diff / scale if scale_rtol and scale else diff)
        assert diff <= atol + scale_rtol * scale, f"{what} {name}: max diff {diff:.3g} (largest value {scale:.3g})"
    return worst


def split_pre_bn_biases(tensors: dict):
    """(the tensors but the pre-BatchNorm biases, those biases) (see PRE_BN_BIAS)."""
    pre = {k: v for k, v in tensors.items() if k.endswith(PRE_BN_BIAS)}
    return {k: v for k, v in tensors.items() if k not in pre}, pre


def rel_close(a: float, b: float, rtol: float = LOSS_RTOL) -> bool:
    """``a`` within ``rtol`` of ``b`` (a NaN is close to nothing)."""
    return abs(a - b) <= rtol * max(abs(b), 1e-6)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """(one-process results, per-rank results) for every config of ddp_step_worker.CONFIGS."""
    out = tmp_path_factory.mktemp("ddp_step")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the spawned ranks at start-up
    try:
        ctx = mp.spawn(W.worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=False)
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old
    try:
        reference = {}
        for name, loss_names, local, counts in W.CONFIGS:  # meanwhile, one process
            batch = W.global_batch(counts)
            slices = [W.rank_slice(batch, r, WORLD) for r in range(WORLD)]
            model, args = W.build(loss_names, False, train=name not in W.EVAL_MODE_CONFIGS)
            probe = copy.deepcopy(model)  # (in train mode, a forward updates the BatchNorm running statistics)
            with torch.no_grad():  # the initial weights' losses over the global batch and over each slice alone
                global_losses, slice_losses = W.losses_of(probe(batch)), [W.losses_of(probe(s)) for s in slices]
            # local negatives: each rank's loss is its slice's own; DDP averages the ranks' gradients
            reference[name] = W.step(model, args, model, slices if local else [batch])
            reference[name].update({"global": global_losses, "slices": slice_losses})
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, f"the DDP ranks did not finish in {JOIN_TIMEOUT_S} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    ranks = {name: [torch.load(os.path.join(out, f"{name}_rank{r}.pt"), weights_only=True) for r in range(WORLD)]
             for name, *_ in W.CONFIGS}
    return reference, ranks, str(out)


@pytest.mark.parametrize("name", [c[0] for c in W.CONFIGS if not c[2]])
def test_one_step_over_two_ranks_equals_one_process(one_step, name):
    """Global losses on every rank, ID loss / accuracies averaged over the ranks, DDP-averaged gradients, the
    parameters after the step and the buffers (RDE's TSE BatchNorm running statistics in train mode): all equal one
    process on the whole batch."""
    reference, ranks, _ = one_step
    ref = reference[name]
    (want,) = ref["losses"]
    for r, res in enumerate(ranks[name]):
        (got,) = res["losses"]
        assert got.keys() == want.keys()
        for k, v in want.items():
            if k not in RANK_MEAN_KEYS:
                assert rel_close(got[k], v), (name, r, k, got[k], v)
        (got_g, got_pre), (want_g, want_pre) = split_pre_bn_biases(res["grads"]), split_pre_bn_biases(ref["grads"])
        g = assert_close_dict(got_g, want_g, 0.0, f"{name} rank {r} gradient", GRAD_RTOL)
        assert_close_dict(got_pre, want_pre, PRE_BN_BIAS_GRAD_ATOL, f"{name} rank {r} pre-BatchNorm bias gradient")
        worst = assert_close_dict(res["params"], ref["params"], PARAM_ATOL, f"{name} rank {r} parameter")
        b = assert_close_dict(res["buffers"], ref["buffers"], 0.0, f"{name} rank {r} buffer", BUFFER_RTOL)
        print(f"{name} rank {r}: max difference: parameters {worst:.2e}, gradients {g:.2e}, buffers {b:.2e} "
              "(relative)")
    for k in set(want) & set(RANK_MEAN_KEYS):
        mean = sum(res["losses"][0][k] for res in ranks[name]) / WORLD
        assert rel_close(mean, want[k]), (name, k, mean, want[k])
    # the check can fail: the global values are not those of the slices (mean of rank means for the MLM)
    slices = ref["slices"]
    for k in {"sdm_loss", "itc_loss", "cmpm_loss", "mlm_loss"} & set(want):
        per_rank = [s[k] for s in slices]
        if all(v == v for v in per_rank):  # a slice without a masked token has a NaN MLM loss
            assert not rel_close(sum(per_rank) / len(per_rank), want[k], 1e-3), (name, k)


def test_local_negatives_keep_the_per_rank_losses(one_step):
    """--local_negatives: each rank's losses are those of its slice alone, the step that of the mean of the ranks'
    losses; the contrastive and MLM losses then differ from the global ones."""
    reference, ranks, _ = one_step
    ref = reference["local"]
    for r, res in enumerate(ranks["local"]):
        (got,) = res["losses"]
        want = ref["losses"][r]
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert rel_close(got[k], v), (r, k, got[k], v)
        for k in ("sdm_loss", "itc_loss", "cmpm_loss", "mlm_loss"):
            assert not rel_close(got[k], ref["global"][k], 1e-3), (r, k)
        g = assert_close_dict(res["grads"], ref["grads"], 0.0, f"local rank {r} gradient", GRAD_RTOL)
        worst = assert_close_dict(res["params"], ref["params"], PARAM_ATOL, f"local rank {r} parameter")
        print(f"local rank {r}: max difference: parameters {worst:.2e}, gradients {g:.2e} (relative)")


def test_ccd_losses_gathered_equal_one_process(one_step, tmp_path):
    """RDE's CCD pass under DDP: each rank computes every other batch, the per-sample losses are gathered, so both
    ranks hold the one-process vectors (and hence the same division)."""
    want = W.ccd_losses()
    for r in range(WORLD):
        got = torch.load(os.path.join(one_step[2], f"ccd_rank{r}.pt"), weights_only=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_params(run_dir):
    ckpt = torch.load(os.path.join(run_dir, "last.pth"), map_location="cpu", weights_only=True)
    return ckpt["model"]


def test_torchrun_two_epochs_equal_one_process(tiny_cuhk_root, tmp_path):
    """2 ranks with 2 loader workers each vs one process without workers, 2 epochs of the identity sampler, global
    batch 8, default AdamW: the same last.pth (attention key biases aside, see split_key_biases) and the same
    metrics.jsonl."""
    steps, lr = 2 * 32 // 8, 1e-3  # 32 training samples; tiny_train_argv's lr
    opts = ("--num_epoch", "2", "--batch_size", "8", "--sampler", "identity", "--num_instance", "2", "--lr", str(lr))
    logs_ddp, logs_one = str(tmp_path / "ddp"), str(tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), os.path.join(REPO, "train.py"),
           *tiny_train_argv(tiny_cuhk_root, logs_ddp, *opts, "--num_workers", "2")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        one = train.main(tiny_train_argv(tiny_cuhk_root, logs_one, *opts, "--num_workers", "0"))  # meanwhile
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # torchrun stops its workers on SIGTERM
            proc.terminate()
            proc.wait(timeout=60)
    assert proc.returncode == 0, out[-4000:]
    (run_dir,) = glob.glob(os.path.join(logs_ddp, "CUHK-PEDES", "*"))
    assert "Using 2 process(es)" in open(os.path.join(run_dir, "train_log.txt")).read()
    assert "Iteration[4/4]" in open(os.path.join(run_dir, "train_log.txt")).read()  # 4 global batches an epoch

    (got, got_kb), (want, want_kb) = split_key_biases(last_params(run_dir)), split_key_biases(last_params(one["run_dir"]))
    worst = assert_close_dict(got, want, PARAM_ATOL, "last.pth")
    worst_kb = assert_close_dict(got_kb, want_kb, 2 * steps * lr * 2.0, "last.pth key bias")  # 2.0: bias_lr_factor
    print(f"torchrun vs one process: max last.pth difference {worst:.2e}, attention key biases {worst_kb:.2e}")
    m_ddp, m_one = read_metrics(run_dir), read_metrics(one["run_dir"])
    assert [m["epoch"] for m in m_ddp] == [m["epoch"] for m in m_one] == [1, 2]
    for a, b in zip(m_ddp, m_one):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-4), (a["epoch"], k)


def test_global_batchnorm_over_two_ranks_equals_one_process(tmp_path):
    """GlobalBatchNorm1d over 2 gloo ranks holding 5 + 2, 1 + 6 and 7 + 0 rows of 3 batches against nn.BatchNorm1d on
    each whole batch: outputs and input gradients (the ranks' rows in order), weight / bias gradients (summed over the
    ranks, as DDP's average of the world-scaled losses), running statistics and num_batches_tracked on every rank,
    for momentum 0.1 and None; then eval mode. nn.BatchNorm1d on each rank's own rows differs."""
    mp.spawn(W.bn_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(os.path.join(tmp_path, f"bn_rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    for m in W.BN_MOMENTA:
        want = W.bn_run(torch.nn.BatchNorm1d(W.BN_CHANNELS, momentum=m), 0, 1)
        for step, ref in enumerate(want):
            got = [res[str(m)][step] for res in ranks]
            for k in ("y", "x_grad"):
                if k in ref and "x_grad" in ref:  # train mode: the ranks' rows in order
                    torch.testing.assert_close(torch.cat([g[k] for g in got]), ref[k], atol=1e-5, rtol=1e-5)
                elif k in ref:  # eval mode: every rank on the whole batch
                    for g in got:
                        torch.testing.assert_close(g[k], ref[k], atol=1e-5, rtol=1e-5)
            for k in ("weight_grad", "bias_grad"):
                if k in ref:
                    torch.testing.assert_close(sum(g[k] for g in got), ref[k], atol=1e-5, rtol=1e-5)
            for g in got:
                for k in buffers:
                    if k in ref:
                        torch.testing.assert_close(g[k], ref[k], atol=1e-6, rtol=1e-6)
        assert int(want[len(W.BN_SPLITS) - 1]["num_batches_tracked"]) == len(W.BN_SPLITS)
    want = W.bn_run(torch.nn.BatchNorm1d(W.BN_CHANNELS), 0, 1, steps=1)[0]
    plain = torch.cat([res["plain"][0]["y"] for res in ranks])
    assert not torch.allclose(plain, want["y"], atol=1e-3)
    assert not torch.allclose(ranks[0]["plain"][0]["running_mean"], want["running_mean"], atol=1e-3)
