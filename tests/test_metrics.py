"""utils/metrics.py: chunked rank vs the original (fixtures + naive reference), Evaluator, DDP gather; meter."""
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import utils.metrics
from benchmarks.reference import rank_naive
from utils.meter import AverageMeter
from utils.metrics import Evaluator, _rank_chunk, _RankAccumulator, rank, rank_from_features

FIX = Path(__file__).parent / "fixtures"
RANK_CASES = json.loads((FIX / "functions.json").read_text())["rank"]


def make_case(nq: int, ng: int, npid: int, seed: int, bonus: float = 0.15):
    """Inputs of the rank fixtures: ``functions.json["rank"]`` holds the original ``rank``'s outputs (cmc, mAP, mINP,
    top-10 indices) on ``make_case(nq, ng, npid, seed)`` for each case's parameters."""
    g = torch.Generator().manual_seed(seed)
    gpids = torch.randint(0, npid, (ng,), generator=g)
    gpids[:npid] = torch.arange(npid)
    qpids = torch.randint(0, npid, (nq,), generator=g)
    sim = torch.rand(nq, ng, generator=g)
    sim += bonus * (qpids[:, None] == gpids[None, :]).float()
    return sim, qpids, gpids


@pytest.mark.parametrize("case", RANK_CASES, ids=[str(c["seed"]) for c in RANK_CASES])
@pytest.mark.parametrize("fn", [rank, rank_naive], ids=["ours", "naive"])
def test_rank_fixture(case, fn):
    sim, qp, gp = make_case(case["nq"], case["ng"], case["npid"], case["seed"])
    cmc, mAP, mINP, indices = fn(sim, qp, gp, max_rank=10, get_mAP=True)
    assert torch.allclose(cmc, torch.tensor(case["cmc"]), atol=1e-4)
    assert float(mAP) == pytest.approx(case["mAP"], abs=1e-4)
    assert float(mINP) == pytest.approx(case["mINP"], abs=1e-4)
    assert torch.equal(indices[:, :10], torch.tensor(case["top10"]))
    cmc_topk, idx = fn(sim, qp, gp, max_rank=10, get_mAP=False)
    assert torch.allclose(cmc_topk, torch.tensor(case["cmc_topk"]), atol=1e-4)
    assert torch.equal(idx[:, :10], torch.tensor(case["top10"]))


def _assert_same(ours, ref, max_rank):
    cmc, mAP, mINP, ind = ours
    rcmc, rmAP, rmINP, rind = ref
    assert cmc.shape == rcmc.shape
    assert torch.allclose(cmc, rcmc, atol=1e-4)
    assert float(mAP) == pytest.approx(float(rmAP), abs=1e-4)
    assert float(mINP) == pytest.approx(float(rmINP), abs=1e-4)
    assert torch.equal(ind, rind[:, :max_rank])


@pytest.mark.parametrize("nq,ng,npid,seed", [(37, 53, 9, 1), (101, 7, 3, 2), (64, 200, 60, 3), (5, 400, 2, 4)])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("use_numpy", [True, False], ids=["numpy", "torch"])
def test_rank_matches_naive_odd_sizes(nq, ng, npid, seed, chunk, use_numpy, monkeypatch):
    monkeypatch.setattr(utils.metrics, "NUMPY_COUNT_ON_CPU", use_numpy)
    sim, qp, gp = make_case(nq, ng, npid, seed)
    ref = rank_naive(sim, qp, gp, max_rank=10)
    _assert_same(rank(sim, qp, gp, max_rank=10, chunk_size=chunk), ref, 10)
    assert rank(sim, qp, gp, max_rank=10, chunk_size=chunk)[0].numel() == min(10, ng)


def test_rank_non_contiguous_similarity():
    sim, qp, gp = make_case(30, 41, 7, 9)
    simT = sim.t().contiguous().t()  # same values, column-major storage (e.g. an i2t matrix passed as S.T)
    assert not simT.is_contiguous()
    _assert_same(rank(simT, qp, gp, chunk_size=4), rank_naive(sim, qp, gp), 10)


def test_rank_from_features_matches_naive():
    g = torch.Generator().manual_seed(5)
    qf, gf = torch.randn(45, 16, generator=g), torch.randn(31, 16, generator=g)
    qp, gp = torch.randint(0, 6, (45,), generator=g), torch.randint(0, 6, (31,), generator=g)
    gp[:6] = torch.arange(6)
    ref = rank_naive(qf @ gf.t(), qp, gp, max_rank=10)
    for chunk in (1, 4, 100):
        _assert_same(rank_from_features(qf, gf, qp, gp, max_rank=10, chunk_size=chunk), ref, 10)


def test_rank_from_features_without_indices_and_unsorted_chunks():
    sim, qp, gp = make_case(50, 40, 9, 8)
    ref = rank_naive(sim, qp, gp, max_rank=10)
    g = torch.Generator().manual_seed(1)
    qf, gf = torch.randn(50, 8, generator=g), torch.randn(40, 8, generator=g)
    cmc, mAP, mINP, ind = rank_from_features(qf, gf, qp, gp, chunk_size=7, need_indices=False)
    assert ind is None
    rcmc, rmAP, rmINP, _ = rank_naive(qf @ gf.t(), qp, gp)
    assert torch.allclose(cmc, rcmc, atol=1e-4)
    assert (float(mAP), float(mINP)) == pytest.approx((float(rmAP), float(rmINP)), abs=1e-4)
    acc = _RankAccumulator(True)  # chunks in natural query order (rows re-sorted inside _rank_chunk)
    for s in range(0, 50, 16):
        acc.add(*_rank_chunk(sim[s:s + 16], qp[s:s + 16], gp, 10, True))
    _assert_same(acc.result(), ref, 10)


def _naive_pessimistic_ties(sim, qp, gp):
    """Reference for the documented tie rule: equal scores put negatives before positives."""
    matches = gp[None, :] == qp[:, None]
    aps, inps = [], []
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda j: (-float(sim[i, j]), bool(matches[i, j])))
        m = matches[i, order].long()
        pos = m.nonzero().view(-1) + 1  # 1-based ranks of positives
        aps.append(float((torch.arange(1, len(pos) + 1) / pos).mean()))
        inps.append(len(pos) / float(pos[-1]))
    return 100 * sum(aps) / len(aps), 100 * sum(inps) / len(inps)


def test_rank_ties_pessimistic():
    g = torch.Generator().manual_seed(7)
    qp, gp = torch.randint(0, 4, (30,), generator=g), torch.randint(0, 4, (25,), generator=g)
    gp[:4] = torch.arange(4)
    sim = torch.randint(0, 3, (30, 25), generator=g).float()  # many ties
    _, mAP, mINP, _ = rank(sim, qp, gp, chunk_size=7)
    rmAP, rmINP = _naive_pessimistic_ties(sim, qp, gp)
    assert float(mAP) == pytest.approx(rmAP, abs=1e-4)
    assert float(mINP) == pytest.approx(rmINP, abs=1e-4)


def test_rank_queries_without_positive():
    sim, qp, gp = make_case(40, 30, 8, 11)
    qp[:5] = 99  # identities absent from the gallery
    cmc, mAP, mINP, _ = rank(sim, qp, gp, chunk_size=6)
    ref_cmc, _ = rank_naive(sim, qp, gp, get_mAP=False)  # the original's CMC counts them as misses
    assert torch.allclose(cmc, ref_cmc, atol=1e-4)
    _, rmAP, rmINP, _ = rank_naive(sim[5:], qp[5:], gp)  # mAP/mINP over queries that have a positive
    assert float(mAP) == pytest.approx(float(rmAP), abs=1e-4)
    assert float(mINP) == pytest.approx(float(rmINP), abs=1e-4)
    with pytest.raises(IndexError):  # the original crashes here
        rank_naive(sim, qp, gp)
    _, mAP, mINP, _ = rank(sim[:5], qp[:5], gp)
    assert torch.isnan(mAP) and torch.isnan(mINP)


def test_rank_bad_shapes():
    with pytest.raises(ValueError, match="similarity"):
        rank(torch.rand(3, 4), torch.arange(3), torch.arange(5))
    with pytest.raises(ValueError, match="chunk_size"):
        rank(torch.rand(3, 4), torch.arange(3), torch.arange(4), chunk_size=0)


# ---------------------------------------------------------------- Evaluator


class FakeModel(nn.Module):
    """encode_text / encode_image are fixed linear maps (text: float 'caption ids' of width 6)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.t = nn.Linear(6, 8, bias=False)
        self.i = nn.Linear(12, 8, bias=False)
        with torch.no_grad():
            self.t.weight.copy_(torch.randn(8, 6, generator=g))
            self.i.weight.copy_(torch.randn(8, 12, generator=g))
        self.seen_training = []

    def encode_text(self, x):
        self.seen_training.append(self.training)
        return self.t(x)

    def encode_image(self, x):
        self.seen_training.append(self.training)
        return self.i(x.flatten(1))  # [B, 3, 2, 2] -> [B, 12]


def make_data(n_txt=23, n_img=13, npid=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    img_pids = torch.randint(0, npid, (n_img,), generator=g)
    img_pids[:npid] = torch.arange(npid)
    txt_pids = torch.randint(0, npid, (n_txt,), generator=g)
    imgs = torch.randn(n_img, 3, 2, 2, generator=g)
    caps = torch.randn(n_txt, 6, generator=g)
    return TensorDataset(img_pids, imgs), TensorDataset(txt_pids, caps)


def expected_metrics(model, img_ds, txt_ds, i2t=False):
    with torch.no_grad():
        t = F.normalize(model.t(txt_ds.tensors[1]), dim=1)
        i = F.normalize(model.i(img_ds.tensors[1].flatten(1)), dim=1)
    out = {}
    for prefix, (q, gal, qp, gp) in [("", (t, i, txt_ds.tensors[0], img_ds.tensors[0])),
                                     ("i2t_", (i, t, img_ds.tensors[0], txt_ds.tensors[0]))][: 2 if i2t else 1]:
        cmc, mAP, mINP, _ = rank_naive(q @ gal.t(), qp, gp)
        out.update({f"{prefix}R1": float(cmc[0]), f"{prefix}R5": float(cmc[4]), f"{prefix}R10": float(cmc[9]),
                    f"{prefix}mAP": float(mAP), f"{prefix}mINP": float(mINP)})
    return out


def test_evaluator_matches_naive(caplog):
    img_ds, txt_ds = make_data()
    model = FakeModel().train()
    ev = Evaluator(DataLoader(img_ds, batch_size=4), DataLoader(txt_ds, batch_size=5), chunk_size=3)
    with caplog.at_level(logging.INFO, logger="IRRA.eval"):
        res = ev.eval(model, i2t_metric=True)
    exp = expected_metrics(model, img_ds, txt_ds, i2t=True)
    assert list(res)[:5] == ["R1", "R5", "R10", "mAP", "mINP"]
    assert set(res) == set(exp)
    for k in exp:
        assert isinstance(res[k], float)
        assert res[k] == pytest.approx(exp[k], abs=1e-4), k
    assert model.training and model.seen_training and not any(model.seen_training)
    text = caplog.text
    assert "t2i" in text and "i2t" in text and "mINP" in text and f"{res['R1']:.3f}" in text
    model.eval()
    res2 = Evaluator(DataLoader(img_ds, batch_size=64), DataLoader(txt_ds, batch_size=64)).eval(model)
    assert not model.training
    assert set(res2) == {"R1", "R5", "R10", "mAP", "mINP"} and res2["mAP"] == pytest.approx(res["mAP"], abs=1e-5)


def test_evaluator_warns_missing_identity(caplog):
    img_ds, txt_ds = make_data()
    txt_ds.tensors[0][:2] = 77
    with caplog.at_level(logging.WARNING, logger="IRRA.eval"):
        Evaluator(DataLoader(img_ds, batch_size=4), DataLoader(txt_ds, batch_size=5)).eval(FakeModel())
    assert "2 of 23 text queries" in caplog.text


class TokenImageModel(nn.Module):
    """encode_text: summed token embeddings of caption_ids [B, L]; encode_image: linear map of [B, 3, 8, 4]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = nn.Embedding(49408, 8)
        self.img = nn.Linear(96, 8)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(49408, 8, generator=g))
            self.img.weight.copy_(torch.randn(8, 96, generator=g))

    def encode_text(self, ids):
        return self.emb(ids).sum(1)  # [B, L, 8] -> [B, 8]

    def encode_image(self, x):
        return self.img(x.flatten(1))  # [B, 3, 8, 4] -> [B, 96] -> [B, 8]


def test_evaluator_with_real_datasets(tmp_path):
    from PIL import Image

    from datasets.bases import ImageDataset, TextDataset
    from datasets.build import build_transforms

    g = torch.Generator().manual_seed(4)
    img_pids, paths = [0, 1, 2, 0, 1, 2, 3], []
    for i in range(len(img_pids)):
        arr = (torch.rand(8, 4, 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    cap_pids = [0, 1, 2, 3, 0, 1, 2, 3, 2]
    caps = ["a woman in a red coat", "a man with a black bag", "blue jeans and white shoes", "short hair",
            "the girl wears a skirt", "he carries a backpack", "grey trousers", "yellow shirt", "a hat"]
    img_ds = ImageDataset(img_pids, paths, transform=build_transforms((8, 4), is_train=False))
    txt_ds = TextDataset(cap_pids, caps, text_length=77)
    model = TokenImageModel()
    res = Evaluator(DataLoader(img_ds, batch_size=3), DataLoader(txt_ds, batch_size=4)).eval(model)
    with torch.no_grad():
        t = F.normalize(model.encode_text(torch.stack([txt_ds[i][1] for i in range(len(txt_ds))])), dim=1)
        i = F.normalize(model.encode_image(torch.stack([img_ds[j][1] for j in range(len(img_ds))])), dim=1)
    cmc, mAP, mINP, _ = rank_naive(t @ i.t(), torch.tensor(cap_pids), torch.tensor(img_pids))
    assert res["R1"] == pytest.approx(float(cmc[0]), abs=1e-4)
    assert res["R5"] == pytest.approx(float(cmc[4]), abs=1e-4)
    assert res["R10"] == pytest.approx(float(cmc[6]), abs=1e-4)  # only 7 gallery items: R10 = R7 = 100
    assert res["R10"] == 100.0
    assert (res["mAP"], res["mINP"]) == pytest.approx((float(mAP), float(mINP)), abs=1e-4)


def _ddp_worker(rank_, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank_, world_size=world)
    try:
        img_ds, txt_ds = make_data()
        ev = Evaluator(DataLoader(img_ds, batch_size=4), DataLoader(txt_ds, batch_size=5), chunk_size=4)
        res = ev.eval(FakeModel(), i2t_metric=True)
        torch.save(res, f"{out_dir}/res{rank_}.pt")
        torch.save(ev._compute_embedding(FakeModel()), f"{out_dir}/emb{rank_}.pt")
    finally:
        dist.destroy_process_group()


def test_evaluator_ddp_gather(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    img_ds, txt_ds = make_data()
    ev = Evaluator(DataLoader(img_ds, batch_size=4), DataLoader(txt_ds, batch_size=5))
    single = ev.eval(FakeModel(), i2t_metric=True)
    single_emb = ev._compute_embedding(FakeModel())
    for r in range(2):
        emb = torch.load(tmp_path / f"emb{r}.pt", weights_only=True)  # gathered in rank order = dataset order
        for a, b in zip(emb, single_emb):
            if isinstance(b, dict):  # the feature sets {name: [N, D]}
                assert a.keys() == b.keys()
                a, b = torch.stack(list(a.values())), torch.stack(list(b.values()))
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
        res = torch.load(tmp_path / f"res{r}.pt", weights_only=True)
        assert res.keys() == single.keys()
        for k in single:
            assert res[k] == pytest.approx(single[k], abs=1e-5), (r, k)


def test_average_meter():
    m = AverageMeter()
    m.update(2.0)
    m.update(4.0, n=3)
    assert (m.val, m.sum, m.count) == (4.0, 14.0, 4)
    assert m.avg == pytest.approx(3.5)
    m.reset()
    assert (m.val, m.avg, m.sum, m.count) == (0, 0, 0, 0)


def test_rank_without_indices_same_metrics():
    g = torch.Generator().manual_seed(5)
    qp, gp = torch.randint(0, 6, (41,), generator=g), torch.randint(0, 6, (29,), generator=g)
    sim = torch.rand(41, 29, generator=g)
    cmc, mAP, mINP, idx = rank(sim, qp, gp, chunk_size=7)
    cmc2, mAP2, mINP2, idx2 = rank(sim, qp, gp, chunk_size=7, need_indices=False)
    assert idx2 is None and idx.shape == (41, 10)
    assert torch.equal(cmc, cmc2) and torch.equal(mAP, mAP2) and torch.equal(mINP, mINP2)
