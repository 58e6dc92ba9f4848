"""TBPS-CLIP's pure parts against the outputs of TBPS's own code (tests/fixtures/tbps/tbps_functions.json, see the
README there): N-ITC, SS, the positional-embedding resizes, the cosine schedule, the tokenizer; plus pre_caption,
C-ITC / R-ITC against naive versions."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from methods.tbps import losses as L
from model.tbps_model import (calc_contrastive, compute_simclr_loss, cosine_scheduler, interpolate_text, pre_caption,
                              resize_pos_embed, tokenize)

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tbps", "tbps_functions.json")


@pytest.fixture(scope="module")
def fx():
    with open(FIX) as f:
        return json.load(f)


def t32(v):
    return torch.tensor(v, dtype=torch.float32)


def keys(fx, prefix):
    out = [k for k in fx if k.startswith(prefix)]
    assert out, prefix
    return out


def test_calc_contrastive(fx):
    x = fx["inputs"]
    i, t, i_s, t_s = (t32(x[k]) for k in ("image", "text", "image_s", "text_s"))
    targets = L.sim_targets_from_ids(torch.tensor(x["pids"]), torch.tensor(x["pids"]))
    assert torch.allclose(targets.sum(1), torch.ones(6))
    for k in keys(fx, "calc_contrastive"):
        alpha, scale = (float(v) for v in re.findall(r"=([\d.]+)", k))
        got = calc_contrastive(i, t, i_s, t_s, i, t, i_s, t_s, targets, alpha, scale)
        assert got.item() == pytest.approx(fx[k], rel=1e-6, abs=1e-6), k


def test_calc_contrastive_alpha_zero_is_cross_entropy_on_identity_targets(fx):
    x = fx["inputs"]
    i, t = t32(x["image"]), t32(x["text"])
    pids = torch.tensor(x["pids"])
    targets = L.sim_targets_from_ids(pids, pids)
    got = calc_contrastive(i, t, i * 0, t * 0, i, t, i * 0, t * 0, targets, 0.0, 10.0)
    naive = 0.0
    for logits in (10 * i @ t.t(), 10 * t @ i.t()):
        naive = naive + sum(-(F.log_softmax(logits[r], 0) * targets[r]).sum() for r in range(6)) / 6 / 2
    assert got.item() == pytest.approx(naive.item(), rel=1e-6)


def test_compute_simclr_loss(fx):
    q = fx["simclr_inputs"]
    a, b = t32(q["q_a"]), t32(q["q_b"])
    for k in keys(fx, "compute_simclr_loss"):
        temperature = float(k.split("=")[1])
        got = compute_simclr_loss(a, b, a, b, torch.arange(6), temperature)
        assert got.item() == pytest.approx(fx[k], rel=1e-6, abs=1e-6), k


def test_resize_pos_embed(fx):
    r = fx["resize_pos_embed"]
    out = resize_pos_embed(t32(r["input"]), torch.zeros(1 + 8 * 4, 16), r["hight"], r["width"])
    torch.testing.assert_close(out, t32(r["output"]), atol=1e-6, rtol=0)


def test_interpolate_text(fx):
    r = fx["interpolate_text"]
    x = t32(r["input"])
    out = interpolate_text(x, r["target_dim"])
    torch.testing.assert_close(out, t32(r["output"]), atol=1e-6, rtol=0)
    assert torch.equal(out[0], x[0]) and torch.equal(out[-1], x[-1])  # SOT and EOT kept
    assert interpolate_text(x, 77) is x


def test_cosine_scheduler(fx):
    want = fx["cosine_scheduler niter_per_ep=7"]
    got = cosine_scheduler(1e-4, 5e-6, 5, 7, 1, 1e-6)
    assert len(got) == len(want) == 35
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[0] == 1e-6 and got[6] == pytest.approx(1e-4) and got[7] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1e-4, 5e-6, 2, 7, 3, 1e-6)


def test_tokenize_keeps_the_eot(fx):
    t = fx["tokenize context_length=12"]
    got = tokenize(t["texts"], 12)
    assert torch.equal(got, torch.tensor(t["ids"]))
    assert (got[:, -1] == 49407).all() and (got[:, 0] == 49406).all()
    short = tokenize("a man", 12)[0]
    assert short.tolist()[:4] == [49406, 320, 786, 49407] and short[4:].eq(0).all()


def test_pre_caption():
    assert pre_caption("A Man (tall)  walks.\n", 77) == "a man tall walks"
    assert pre_caption('x!"y*#z:;~w', 77) == "x y z w"
    assert pre_caption("one two three four", 2) == "one two"
    assert pre_caption("keeps, commas - and-dashes", 77) == "keeps, commas - and-dashes"


def test_citc_and_ritc_against_naive_versions():
    g = torch.Generator().manual_seed(0)
    i = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    t = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    s = 20.0
    naive_citc = 0.25 * ((i @ i.t() - t @ t.t()) ** 2).mean() + 0.25 * ((i @ t.t() - t @ i.t()) ** 2).mean()
    assert L.compute_citc(i, t, s).item() == pytest.approx(naive_citc.item(), rel=1e-5)
    pids = torch.tensor([0, 0, 1, 2, 2])
    q = L.sim_targets_from_ids(pids, pids) + 1e-2
    naive = 0.0
    for logits in (s * i @ t.t(), s * t @ i.t()):
        p = F.softmax(logits, 1)
        naive = naive + (p * (p.log() - q.log())).sum() / 5 / 2  # KL(model || targets + eps), batch mean
    assert L.compute_ritc(i, t, i, t, L.sim_targets_from_ids(pids, pids), s).item() == pytest.approx(naive.item(),
                                                                                                    rel=1e-5)
    assert not math.isnan(L.compute_ritc(i, t, i, t, L.sim_targets_from_ids(pids, pids), s).item())
