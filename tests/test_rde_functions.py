"""RDE's pure parts against the outputs of RDE's own code (tests/fixtures/rde/rde_functions.json, see its README):
per-sample losses, compute_rbs with gradients, the TSE layers, noise injection, split_prob and the GMM split."""
import copy
import json
import os

import numpy as np
import pytest
import torch

from datasets.bases import draw_noisy_index, inject_noisy_correspondence
from model import objectives
from model.CrossEmbeddingLayer_tse import (MLP, GlobalBatchNorm1d, TexualEmbeddingLayer, VisualEmbeddingLayer, l2norm,
                                          maxk_pool1d_var)
from methods.rde.ccd import consensus_labels, divide, gmm_clean_prob, min_max_normalise
from processor.processor import split_prob

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "rde", "rde_functions.json")


@pytest.fixture(scope="module")
def fx():
    with open(FIX) as f:
        return json.load(f)


def t32(v):
    return torch.tensor(v, dtype=torch.float32)


def _scores(L):
    i, t = t32(L["image_features"]), t32(L["text_features"])
    return (t / t.norm(dim=-1, keepdim=True)) @ (i / i.norm(dim=-1, keepdim=True)).t()


def test_scores_and_per_sample_losses(fx):
    L, F = fx["loss_inputs"], fx["losses"]
    s, pid = _scores(L), torch.tensor(L["pids"])
    torch.testing.assert_close(s, t32(F["scores"]), atol=1e-6, rtol=0)
    for tau, margin in ((0.015, 0.1), (0.02, 0.2)):
        torch.testing.assert_close(objectives.compute_TAL_per(s, pid, tau, margin),
                                   t32(F[f"TAL_per tau={tau} margin={margin}"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(objectives.compute_TRL_per(s, pid, margin=margin, tau=tau),
                                   t32(F[f"TRL_per tau={tau} margin={margin}"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(objectives.compute_InfoNCE_per(s, 50), t32(F["InfoNCE_per logit_scale=50"]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(objectives.compute_sdm_per(s, pid, 50), t32(F["sdm_per logit_scale=50"]),
                               atol=1e-5, rtol=1e-5)
    # a case where TAL is not all zeros (the fixture's margins leave it at 0): a positive per-sample loss
    rnd = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)).tanh()
    assert (objectives.compute_TAL_per(rnd, pid, 0.015, 0.1) > 0).any()


@pytest.mark.parametrize("loss_type", ["TAL", "TRL", "InfoNCE", "SDM"])
def test_per_loss_and_rbs_with_gradients(fx, loss_type):
    L, F = fx["loss_inputs"], fx["losses"]
    pid, label_hat = torch.tensor(L["pids"]), t32(L["label_hat"])
    per, diag = objectives.compute_per_loss(t32(L["image_features"]), t32(L["text_features"]), pid, tau=0.015,
                                            margin=0.1, loss_type=loss_type, logit_scale=50)
    torch.testing.assert_close(per, t32(F[f"per_loss {loss_type}"]["per_loss"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diag, t32(F[f"per_loss {loss_type}"]["diag"]), atol=1e-6, rtol=0)
    i = t32(L["image_features"]).requires_grad_()
    t = t32(L["text_features"]).requires_grad_()
    bge, tse = objectives.compute_rbs(i, t, t32(L["image_tse"]), t32(L["text_tse"]), pid, label_hat, tau=0.015,
                                      margin=0.1, loss_type=loss_type, logit_scale=50)
    ref = F[f"rbs {loss_type}"]
    torch.testing.assert_close(bge, torch.tensor(ref["loss_bge"], dtype=torch.float32), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tse, torch.tensor(ref["loss_tse"], dtype=torch.float32), atol=1e-5, rtol=1e-5)
    gi, gt = torch.autograd.grad(bge + tse, (i, t))
    torch.testing.assert_close(gi, t32(ref["grad_image"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gt, t32(ref["grad_text"]), atol=1e-5, rtol=1e-4)


def test_unknown_loss_type_raises():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="valid"):
        objectives.compute_per_loss(x, x, torch.arange(4), loss_type="triplet")


def _state(sd):
    return {k: torch.tensor(v, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
            for k, v in sd.items()}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_tse_layers(fx, mode):
    d = fx["tse"]
    vis = VisualEmbeddingLayer(d["input_dim"], d["embed_dim"], d["ratio"])
    txt = TexualEmbeddingLayer(d["input_dim"], d["embed_dim"], d["ratio"])
    vis.load_state_dict(_state(d["visual_state_dict"]))
    txt.load_state_dict(_state(d["textual_state_dict"]))
    vis.train(mode == "train")
    txt.train(mode == "train")
    atten_i, atten_t = t32(d["atten_i"]), t32(d["atten_t"])
    before_i, before_t = atten_i.clone(), atten_t.clone()
    out_v = vis(t32(d["base_features"]), atten_i)
    out_t = txt(t32(d["text_features"]), torch.tensor(d["text"]), atten_t)
    torch.testing.assert_close(out_v, t32(d[f"visual_{mode}"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_t, t32(d[f"textual_{mode}"]), atol=1e-5, rtol=1e-5)
    assert torch.equal(atten_i, before_i) and torch.equal(atten_t, before_t)  # RDE wrote into them
    if mode == "train":
        for bn, ref in zip(vis.mlp.bns, d["visual_running_mean_after_train"]):
            torch.testing.assert_close(bn.running_mean, t32(ref), atol=1e-6, rtol=1e-5)
    (out_v.sum() + out_t.sum()).backward()  # back-propagates into every used parameter
    assert vis.fc.weight.grad is not None and txt.linear.weight.grad is not None


def test_tse_keys_and_helpers():
    vis, txt = VisualEmbeddingLayer(), TexualEmbeddingLayer()
    assert {k.split(".")[0] for k in vis.state_dict()} == {"linear", "fc", "mlp"}
    assert {k.split(".")[0] for k in txt.state_dict()} == {"linear", "mlp"}
    assert vis.fc.in_features == 512 and vis.fc.out_features == 1024  # RDE's defaults
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(l2norm(x, -1).norm(dim=-1), torch.ones(3, 5), atol=1e-6, rtol=0)
    pooled = maxk_pool1d_var(x, 1, 1, torch.tensor([5, 2, 3]))
    torch.testing.assert_close(pooled, torch.stack([x[0].max(0)[0], x[1, :2].max(0)[0], x[2, :3].max(0)[0]]))
    assert MLP(4, 6, 8, 2)(torch.randn(2, 3, 4)).shape == (2, 3, 8)


def test_global_batchnorm_is_batchnorm_in_one_process():
    """Without torch.distributed GlobalBatchNorm1d is nn.BatchNorm1d bit for bit, with its keys (the 2-rank case:
    tests/test_ddp_equivalence.py)."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    bn = GlobalBatchNorm1d(5)
    bn.load_state_dict(ref.state_dict(), strict=True)  # the same keys
    assert isinstance(bn, torch.nn.BatchNorm1d)
    assert all(isinstance(m, GlobalBatchNorm1d) for m in MLP(4, 6, 8, 2).bns)
    for train in (True, True, False):
        x = torch.randn(7, 5) * 3 + 1
        assert torch.equal(bn.train(train)(x), ref.train(train)(x))
        for k, v in ref.state_dict().items():
            assert torch.equal(bn.state_dict()[k], v), k


def test_noise_injection_from_index_file(fx, tmp_path):
    n = fx["noise"]
    path = tmp_path / "idx.npy"
    np.save(path, np.array(n["noisy_index"]))
    rows = [tuple(r) for r in n["rows"]]
    before = copy.deepcopy(rows)
    out, real = inject_noisy_correspondence(rows, n["noisy_rate"], str(path))
    assert [list(r) for r in out] == n["rows_after"]
    assert real.tolist() == n["real_correspondences"]
    assert rows == before  # the input rows are not modified


def test_noise_injection_drawn_from_seed(tmp_path):
    rows = [(i // 2, i, f"img{i}.jpg", f"caption {i}") for i in range(200)]
    path = tmp_path / "sub" / "noise.npy"
    out, real = inject_noisy_correspondence(rows, 0.5, str(path), seed=3)
    saved = np.load(path)
    assert saved.tolist() == draw_noisy_index(200, 0.5, 3).tolist()
    assert not [p for p in os.listdir(path.parent) if p.startswith(".tmp_")]  # written atomically
    assert 90 <= int((real == 0).sum()) <= 100  # 100 rows permuted among themselves (a few may draw their own)
    assert all(o[:3] == r[:3] for o, r in zip(out, rows))  # images and pids stay
    assert sorted(o[3] for o in out) == sorted(r[3] for r in rows)  # captions are permuted
    # the same file again gives the same rows; another seed another draw
    assert inject_noisy_correspondence(rows, 0.5, str(path), seed=99)[0] == out
    assert draw_noisy_index(200, 0.5, 4).tolist() != saved.tolist()
    assert inject_noisy_correspondence(rows, 0.0, None)[1].sum() == 200


def test_noise_file_errors(tmp_path):
    rows = [(0, i, "a.jpg", str(i)) for i in range(10)]
    bad = tmp_path / "bad.npy"
    np.save(bad, np.arange(7))
    with pytest.raises(ValueError, match="bad.npy"):
        inject_noisy_correspondence(rows, 0.5, str(bad))
    np.save(bad, np.arange(10) + 5)
    with pytest.raises(ValueError, match="bad.npy"):
        inject_noisy_correspondence(rows, 0.5, str(bad))
    with pytest.raises(ValueError, match="noisy_rate"):
        inject_noisy_correspondence(rows, 1.5, None)


def test_split_prob(fx):
    s = fx["split_prob"]
    assert split_prob(np.array(s["prob_a"]), 0.5).tolist() == s["pred_a"]
    assert split_prob(np.array(s["prob_all_clean"]), 0.5).tolist() == s["pred_all_clean"]


@pytest.mark.parametrize("setting", ["fast", "precise"])
def test_gmm_split(fx, setting):
    c = fx["ccd"]
    for branch in "AB":
        prob = gmm_clean_prob(min_max_normalise(torch.tensor(c[f"loss_{branch}"])).numpy(), setting, random_state=0)
        np.testing.assert_allclose(prob, c[f"prob_{branch}_{setting}"], atol=1e-4)
        assert split_prob(prob, 0.5).tolist() == c[f"pred_{branch}_{setting}"]
    with pytest.raises(ValueError, match="gmm_setting"):
        gmm_clean_prob(np.zeros(4), "slow")


def test_consensus_and_divide(fx):
    a, b = np.array([1, 1, 0, 0, 1, 0] * 50), np.array([1, 0, 1, 0, 1, 0] * 50)
    lab = consensus_labels(a, b, torch.Generator().manual_seed(0))
    assert lab[(a + b) == 2].eq(1).all() and lab[(a + b) == 0].eq(0).all()
    flips = lab[(a + b) == 1]
    assert 0 < flips.sum() < flips.numel()  # coin flips, not a constant
    assert torch.equal(lab, consensus_labels(a, b, torch.Generator().manual_seed(0)))
    c = fx["ccd"]
    la, lb = torch.tensor(c["loss_A"]), torch.tensor(c["loss_B"])
    real = np.array(c["pred_A_precise"]) & np.array(c["pred_B_precise"])
    l1, st1 = divide(la, lb, seed=1, epoch=2, setting="precise", real=real)
    l2, _ = divide(la, lb, seed=1, epoch=2, setting="precise", real=real)
    assert torch.equal(l1, l2)  # a function of (seed, epoch)
    assert st1["clean_recall"] == 1.0 and 0 < st1["clean_precision"] <= 1
    assert st1["clean"] == int(l1.sum()) and st1["total"] == 200
