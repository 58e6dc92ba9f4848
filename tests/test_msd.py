"""mSD (UFineBench's mean Similarity Distribution, utils/msd.py): the conformance cases computed by UFineBench's own
``mSD_rank`` (tests/fixtures/ufine/, faithful, permuted gallery, rank order), and the chunked computation against the
step-by-step reference (benchmarks/reference.py) on odd sizes, chunk sizes and both counting paths."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import utils.metrics
from benchmarks.reference import msd_rank_naive
from utils.metrics import mSD_rank, rank_from_features
from utils.msd import MSDAccumulator, block_sums, prefix_sums

CASES = json.loads((Path(__file__).parent / "fixtures" / "ufine" / "msd.json").read_text())


def _inputs(case):
    return (torch.tensor(case["similarity"]), torch.tensor(case["q_pids"]), torch.tensor(case["g_pids"]),
            torch.tensor(case["perm"]))


@pytest.mark.parametrize("case", CASES, ids=[f"{len(c['q_pids'])}x{len(c['g_pids'])}" for c in CASES])
@pytest.mark.parametrize("fn", [mSD_rank, msd_rank_naive], ids=["ours", "naive"])
def test_conformance_cases(case, fn):
    sim, qp, gp, perm = _inputs(case)
    cmc, msd, mAP = fn(sim, qp, gp, max_rank=10)
    assert [float(cmc[k - 1]) for k in (1, 5, 10)] == pytest.approx([case["R1"], case["R5"], case["R10"]], abs=1e-4)
    assert float(msd) == pytest.approx(case["mSD"], abs=1e-4)
    assert float(mAP) == pytest.approx(case["mAP"], abs=1e-4)
    # the published value depends on the storage order of the gallery; R@k and mAP do not
    cmc_p, msd_p, mAP_p = fn(sim[:, perm], qp, gp[perm], max_rank=10)
    assert float(msd_p) == pytest.approx(case["mSD_permuted_gallery"], abs=1e-4)
    assert abs(case["mSD_permuted_gallery"] - case["mSD"]) > 0.1
    assert torch.allclose(cmc_p, cmc, atol=1e-4) and float(mAP_p) == pytest.approx(float(mAP), abs=1e-4)
    # the rank-order variant: the README's definition, the same for both storage orders
    for s, g in ((sim, gp), (sim[:, perm], gp[perm])):
        _, msd_r, _ = fn(s, qp, g, max_rank=10, rank_order=True)
        assert float(msd_r) == pytest.approx(case["mSD_sorted"], abs=1e-4)


def _random_case(nq, ng, npid, seed):
    g = torch.Generator().manual_seed(seed)
    gp = torch.randint(0, npid, (ng,), generator=g)
    gp[:npid] = torch.arange(npid)
    qp = torch.randint(0, npid, (nq,), generator=g)
    qf = F.normalize(torch.randn(nq, 16, generator=g), dim=1)
    gf = F.normalize(torch.randn(ng, 16, generator=g) + 0.5 * F.one_hot(gp % 16, 16).float(), dim=1)
    return qf, gf, qp, gp


@pytest.mark.parametrize("nq,ng,npid,seed", [(37, 53, 9, 1), (101, 7, 3, 2), (64, 200, 60, 3), (5, 400, 2, 4)])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("use_numpy", [True, False], ids=["numpy", "torch"])
def test_chunked_matches_naive(nq, ng, npid, seed, chunk, use_numpy, monkeypatch):
    monkeypatch.setattr(utils.metrics, "NUMPY_COUNT_ON_CPU", use_numpy)
    qf, gf, qp, gp = _random_case(nq, ng, npid, seed)
    sim = qf @ gf.t()
    for rank_order in (False, True):
        cmc, msd, mAP = mSD_rank(sim, qp, gp, max_rank=10, rank_order=rank_order, chunk_size=chunk)
        rcmc, rmsd, rmAP = msd_rank_naive(sim, qp, gp, max_rank=10, rank_order=rank_order)
        assert torch.allclose(cmc, rcmc[:cmc.numel()], atol=1e-4)
        assert float(msd) == pytest.approx(float(rmsd), abs=1e-4), rank_order
        assert float(mAP) == pytest.approx(float(rmAP), abs=1e-4)


def test_from_features_both_variants_in_one_pass():
    qf, gf, qp, gp = _random_case(90, 70, 12, 5)
    acc = MSDAccumulator()
    rank_from_features(qf, gf, qp, gp, chunk_size=16, need_indices=False, observer=acc)
    got = acc.result()
    assert set(got) == {"mSD", "mSD_rank_order"}
    sim = qf @ gf.t()
    assert got["mSD"] == pytest.approx(float(msd_rank_naive(sim, qp, gp)[1]), abs=1e-4)
    assert got["mSD_rank_order"] == pytest.approx(float(msd_rank_naive(sim, qp, gp, rank_order=True)[1]), abs=1e-4)


def test_queries_without_positive_are_left_out():
    qf, gf, qp, gp = _random_case(40, 30, 6, 6)
    qp = qp.clone()
    qp[:4] = 99  # no gallery item of id 99
    sim = qf @ gf.t()
    for rank_order in (False, True):
        _, msd, mAP = mSD_rank(sim, qp, gp, rank_order=rank_order)
        _, ref, ref_mAP = msd_rank_naive(sim[4:], qp[4:], gp, rank_order=rank_order)
        assert float(msd) == pytest.approx(float(ref), abs=1e-4)
        assert float(mAP) == pytest.approx(float(ref_mAP), abs=1e-4)


def test_rank_order_is_invariant_and_faithful_is_not():
    qf, gf, qp, gp = _random_case(50, 40, 8, 7)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    sim = qf @ gf.t()
    a = [float(mSD_rank(s, qp, g, rank_order=True)[1]) for s, g in ((sim, gp), (sim[:, perm], gp[perm]))]
    b = [float(mSD_rank(s, qp, g)[1]) for s, g in ((sim, gp), (sim[:, perm], gp[perm]))]
    assert a[0] == pytest.approx(a[1], abs=1e-5)
    assert abs(b[0] - b[1]) > 1e-3


def test_accumulator_needs_a_variant():
    with pytest.raises(ValueError, match="faithful and/or rank_order"):
        MSDAccumulator(faithful=False, rank_order=False)


@pytest.mark.parametrize("ng,block", [(200, 64), (64, 64), (50, 64), (129, 8)])
def test_prefix_sums_match_cumsum(ng, block):
    g = torch.Generator().manual_seed(ng)
    sim = torch.rand(7, ng, generator=g) * 2 - 1
    cols = torch.randint(0, ng, (7, 5), generator=g)
    cols[0] = torch.tensor([0, ng - 1, min(block - 1, ng - 1), min(block, ng - 1), ng // 2])
    ref = torch.cumsum(sim.double(), 1).gather(1, cols)
    assert torch.allclose(prefix_sums(sim, cols, block), ref, atol=1e-5)
    assert torch.allclose(prefix_sums(sim.half(), cols, block),  # torch's path (other dtypes / devices)
                          torch.cumsum(sim.half().double(), 1).gather(1, cols), atol=1e-6)
    # block sums: numpy's path (float32 on CPU) and torch's (other dtypes / devices)
    ref_blocks = torch.stack([sim[:, j:j + block].double().sum(1) for j in range(0, ng, block)], 1)
    assert torch.allclose(block_sums(sim, block), ref_blocks, atol=1e-5)
    half = sim.half()
    ref_half = torch.stack([half[:, j:j + block].double().sum(1) for j in range(0, ng, block)], 1)
    assert torch.allclose(block_sums(half, block), ref_half, atol=1e-6)


def test_evaluator_reports_msd_when_asked(caplog):
    """Evaluator(metrics=("mSD",)): t2i mSD and mSD_rank_order beside R@k / mAP (i2t has none), in the table too."""
    import logging

    from torch.utils.data import DataLoader
    from tests.test_metrics import FakeModel, make_data
    from utils.metrics import Evaluator

    img_ds, txt_ds = make_data()
    model = FakeModel()
    with caplog.at_level(logging.INFO, logger="IRRA.eval"):
        res = Evaluator(DataLoader(img_ds, batch_size=4), DataLoader(txt_ds, batch_size=5), chunk_size=3,
                        metrics=("mSD",)).eval(model, i2t_metric=True)
    with torch.no_grad():
        t = F.normalize(model.t(txt_ds.tensors[1]), dim=1)
        i = F.normalize(model.i(img_ds.tensors[1].flatten(1)), dim=1)
    sim, qp, gp = t @ i.t(), txt_ds.tensors[0], img_ds.tensors[0]
    assert res["mSD"] == pytest.approx(float(msd_rank_naive(sim, qp, gp)[1]), abs=1e-4)
    assert res["mSD_rank_order"] == pytest.approx(float(msd_rank_naive(sim, qp, gp, rank_order=True)[1]), abs=1e-4)
    assert "i2t_mSD" not in res and "i2t_R1" in res
    header = next(line for line in caplog.text.splitlines() if "| task" in line)
    assert "mSD" in header and "mSD_rank_order" in header and f"{res['mSD']:.3f}" in caplog.text
    plain = Evaluator(DataLoader(img_ds, batch_size=4), DataLoader(txt_ds, batch_size=5)).eval(model)
    assert "mSD" not in plain and plain["R1"] == pytest.approx(res["R1"])
