"""IRRA losses vs the original's outputs (functions.json) and naive re-implementations."""
import json
import math
import os

import pytest
import torch

from model import objectives

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "functions.json")


@pytest.fixture(scope="module")
def data():
    with open(FIX) as f:
        d = json.load(f)
    inp = {k: (torch.tensor(v) if isinstance(v, list) else v) for k, v in d["losses_inputs"].items()}
    return inp, d["losses"]


def close(a, b, rel=1e-5):
    return a == pytest.approx(b, rel=rel, abs=1e-6)


def test_sdm(data):
    x, e = data
    assert close(objectives.compute_sdm(x["img"], x["txt"], x["pids"], x["logit_scale"]).item(), e["sdm"])
    got = objectives.compute_sdm(x["img"], x["txt"], x["pids"], x["logit_scale"], image_id=x["image_ids"]).item()
    assert close(got, e["sdm_image_id"])


def test_itc(data):
    x, e = data
    assert close(objectives.compute_itc(x["img"], x["txt"], x["logit_scale"]).item(), e["itc"])


def test_cmpm(data):
    x, e = data
    assert close(objectives.compute_cmpm(x["img"], x["txt"], x["pids"]).item(), e["cmpm"])


def test_id(data):
    x, e = data
    assert close(objectives.compute_id(x["img_logits"], x["txt_logits"], x["pids"]).item(), e["id"])


def test_mlm(data):
    x, e = data
    assert (x["mlm_labels"] == 0).any()  # ignored positions present
    assert close(objectives.compute_mlm(x["mlm_scores"], x["mlm_labels"]).item(), e["mlm"])


def _naive_kl_loss(logits, target):
    """sum_rows mean of KL(softmax(logits_i) || target_i), target_i normalised to sum 1 (+eps)."""
    total = 0.0
    for i in range(logits.shape[0]):
        p = torch.softmax(logits[i].double(), 0)
        q = target[i].double()
        total += float((p * (torch.log(p) - torch.log(q + 1e-8))).sum())
    return total / logits.shape[0]


def test_sdm_naive():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    pids = torch.tensor([0, 0, 1, 2, 2, 2])
    scale = 3.0
    cos = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).t()
    lab = (pids[:, None] == pids[None, :]).double()
    target = lab / lab.sum(1, keepdim=True)
    expected = _naive_kl_loss(scale * cos, target) + _naive_kl_loss(scale * cos.t(), target)
    assert objectives.compute_sdm(img, txt, pids, scale).item() == pytest.approx(expected, rel=1e-5)


def test_itc_naive():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = 2.0
    cos = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).t()
    logits = (scale * cos).double()
    li = -sum(float(torch.log_softmax(logits[i], 0)[i]) for i in range(5)) / 5
    lt = -sum(float(torch.log_softmax(logits[:, i], 0)[i]) for i in range(5)) / 5
    got = objectives.compute_itc(img, txt, scale).item()
    assert got == pytest.approx((li + lt) / 2, rel=1e-5)
    assert got > 0.1


def test_mlm_ignores_label_zero():
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    expected = (-math.log(math.exp(3) / (2 + math.exp(3))) - math.log(1 / 3)) / 2
    assert objectives.compute_mlm(scores, labels).item() == pytest.approx(expected, rel=1e-6)
