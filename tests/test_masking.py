"""MLM masking: statistics, the original's algorithm (naive re-implementation), caption_ids clean/masked, caching."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.bases import STREAM_TEXT, ImageTextMLMDataset, build_random_masked_tokens_and_labels, tokenize
from datasets.synthpedes import make_caption, sample_identities
from utils.simple_tokenizer import SimpleTokenizer

TOK = SimpleTokenizer()
MASK, SOT, EOT = 49405, 49406, 49407


def captions(n, seed=0):
    rng = random.Random(seed)
    idents = sample_identities(50, rng)
    return [make_caption(rng.choice(idents), rng) for _ in range(n)]


def original_mask(tokens, rng):
    """The original IRRA _build_random_masked_tokens_and_labels, verbatim logic (mutates ``tokens`` in place)."""
    mask = TOK.encoder["<|mask|>"]
    token_range = list(range(1, len(TOK.encoder) - 3))
    labels = []
    for i, token in enumerate(tokens):
        if 0 < token < 49405:
            prob = rng.random()
            if prob < 0.15:
                prob /= 0.15
                if prob < 0.8:
                    tokens[i] = mask
                elif prob < 0.9:
                    tokens[i] = rng.choice(token_range)
                labels.append(token)
            else:
                labels.append(0)
        else:
            labels.append(0)
    if all(l == 0 for l in labels):
        labels[1] = tokens[1]
        tokens[1] = mask
    return torch.tensor(tokens), torch.tensor(labels)


def test_matches_original_algorithm_and_rng_order():
    ids = [tokenize(c, TOK, 77) for c in captions(300)]
    r1, r2 = random.Random(5), random.Random(5)
    for t in ids:
        before = t.clone()
        mine = build_random_masked_tokens_and_labels(t.tolist(), MASK, r1)
        arr = t.numpy().copy()
        orig = original_mask(arr, r2)
        assert torch.equal(mine[0], orig[0]) and torch.equal(mine[1], orig[1])
        assert torch.equal(torch.from_numpy(arr), mine[0])  # the original's in-place masking
        assert torch.equal(t, before)  # ours leaves the input alone


def test_masking_statistics():
    ids = torch.stack([tokenize(c, TOK, 77) for c in captions(3000, seed=1)])
    rng = random.Random(0)
    out = [build_random_masked_tokens_and_labels(t.tolist(), MASK, rng) for t in ids]
    mlm = torch.stack([o[0] for o in out])
    labels = torch.stack([o[1] for o in out])
    eligible = (ids > 0) & (ids < MASK)
    chosen = labels > 0
    n_el = int(eligible.sum())
    assert n_el > 60000
    # labels hold the original ids where chosen, only eligible positions are ever chosen
    assert torch.equal(labels[chosen], ids[chosen])
    assert not (chosen & ~eligible).any()
    special = (ids == 0) | (ids >= MASK)
    assert torch.equal(mlm[special], ids[special])  # SOT / EOT / padding untouched
    rate = chosen.sum().item() / n_el
    assert abs(rate - 0.15) < 0.006
    n_ch = chosen.sum().item()
    to_mask = (mlm[chosen] == MASK).float().mean().item()
    unchanged = (mlm[chosen] == ids[chosen]).float().mean().item()
    rand = chosen & (mlm != MASK) & (mlm != ids)
    assert abs(to_mask - 0.8) < 0.015 and abs(unchanged - 0.1) < 0.012
    assert abs(rand.sum().item() / n_ch - 0.1) < 0.012
    r = mlm[rand]
    assert r.min() >= 1 and r.max() < MASK and len(set(r.tolist())) > 0.9 * len(r)  # spread over [1, 49405)
    assert not (mlm[~chosen] != ids[~chosen]).any()  # nothing else changes


def test_custom_rates_and_forced_position():
    t = tokenize("a man in a red shirt", TOK, 16)
    ids, labels = build_random_masked_tokens_and_labels(t.tolist(), MASK, random.Random(0), mlm_probability=1e-12)
    assert labels.tolist() == [0, t[1].item()] + [0] * 14
    assert ids[1] == MASK and torch.equal(ids[2:], t[2:]) and ids[0] == SOT
    ids, labels = build_random_masked_tokens_and_labels(t.tolist(), MASK, random.Random(0), mlm_probability=1.0,
                                                        masked_token_rate=0.0, masked_token_unchanged_rate=1.0)
    assert torch.equal(ids, t) and torch.equal(labels[1:7], t[1:7]) and labels[7] == 0  # EOT at 7
    ids, labels = build_random_masked_tokens_and_labels(t.tolist(), MASK, random.Random(0), mlm_probability=1.0,
                                                        masked_token_rate=1.0, masked_token_unchanged_rate=0.0)
    assert (ids[1:7] == MASK).all() and ids[0] == SOT and ids[7] == EOT and torch.equal(labels[1:7], t[1:7])
    ids, _ = build_random_masked_tokens_and_labels(t.tolist(), MASK, random.Random(0), mlm_probability=1.0,
                                                   masked_token_rate=0.0, masked_token_unchanged_rate=0.0)
    assert (ids[1:7] != t[1:7]).all() and (ids[1:7] < MASK).all() and ids[7] == EOT


def _rows(tmp_path, n=20):
    rows = []
    for i, cap in enumerate(captions(n, seed=3)):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 16), (i, 0, 0)).save(p)
        rows.append((i // 2, i, str(p), cap))
    return rows


def test_dataset_caption_ids_clean_by_default_and_masked_with_option(tmp_path):
    rows = _rows(tmp_path)
    tf = lambda im: torch.zeros(1)  # noqa: E731
    ds = ImageTextMLMDataset(rows, tf, tokenizer=TOK)
    n_diff = 0
    for i, (_, _, _, cap) in enumerate(rows):
        item = ds[i]
        clean = tokenize(cap, TOK, 77)
        assert torch.equal(item["caption_ids"], clean)
        # by default the masks are the original's (rates 0.15 / 0.8 / 0.1), drawn from the sample's own generator
        orig_ids, orig_labels = original_mask(clean.tolist(), random.Random(ds.sample_rng(i, STREAM_TEXT)))
        assert torch.equal(item["mlm_ids"], orig_ids) and torch.equal(item["mlm_labels"], orig_labels)
        sel = item["mlm_labels"] > 0
        assert torch.equal(item["mlm_labels"][sel], clean[sel]) and sel.any()
        n_diff += int((item["mlm_ids"] != clean).any())
    assert n_diff >= len(rows) - 2
    bug = ImageTextMLMDataset(rows, tf, tokenizer=TOK, mlm_mask_caption=True)
    for i in range(len(rows)):
        item = bug[i]
        assert torch.equal(item["caption_ids"], item["mlm_ids"])
        assert item["caption_ids"] is not item["mlm_ids"]
    # the cache stays clean after masking with the original behaviour
    assert torch.equal(bug.caption_ids[0].long(), tokenize(rows[0][3], TOK, 77))


def test_each_caption_tokenized_once(tmp_path):
    rows = _rows(tmp_path, 6)
    rows = rows + rows  # duplicated captions
    calls = []

    class CountingTok(SimpleTokenizer):
        def encode(self, text, **kwargs):
            calls.append(text)
            return super().encode(text, **kwargs)

    ds = ImageTextMLMDataset(rows, lambda im: torch.zeros(1), tokenizer=CountingTok())
    assert sorted(calls) == sorted({r[3] for r in rows})
    for i in range(len(rows)):
        ds[i]
    assert len(calls) == len({r[3] for r in rows})


def test_bad_rates_raise(tmp_path):
    rows = _rows(tmp_path, 2)
    with pytest.raises(ValueError, match="masked_token_rate \\+ masked_token_unchanged_rate must be <= 1"):
        ImageTextMLMDataset(rows, tokenizer=TOK, masked_token_rate=0.9, masked_token_unchanged_rate=0.2)
    with pytest.raises(ValueError, match="mlm_probability must be in \\[0, 1\\], got 1.5"):
        ImageTextMLMDataset(rows, tokenizer=TOK, mlm_probability=1.5)
