"""CLIP BPE tokenizer with <|mask|>: conformance with the original (functions.json["tokenizer"])."""
import json
import os

import pytest
import torch

from utils.simple_tokenizer import SimpleTokenizer, default_bpe, get_tokenizer, tokenize

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "functions.json")


@pytest.fixture(scope="module")
def golden():
    with open(FIX) as f:
        return json.load(f)["tokenizer"]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_default_bpe_is_repo_file():
    assert os.path.isfile(default_bpe())
    assert default_bpe().endswith(os.path.join("data", "bpe_simple_vocab_16e6.txt.gz"))


def test_vocab_and_special_tokens(tok, golden):
    assert len(tok.encoder) == golden["vocab_len"] == 49408
    for name, idx in golden["special"].items():
        assert tok.encoder[name] == idx
        assert tok.decoder[idx] == name
    assert tok.encode("a <|mask|> shirt") == [320, 49405, 2523]


def test_encode_decode(tok, golden):
    assert len(golden["captions"]) >= 4
    for cap, ids, text in zip(golden["captions"], golden["encode"], golden["decode"]):
        assert tok.encode(cap) == ids
        assert tok.decode(ids) == text


@pytest.mark.parametrize("length,key", [(77, "tokenize77"), (24, "tokenize24")])
def test_tokenize(tok, golden, length, key):
    truncated = 0
    for cap, expected in zip(golden["captions"], golden[key]):
        out = tokenize(cap, tok, text_length=length, truncate=True)
        assert out.dtype == torch.long and out.shape == (length,)
        assert out.tolist() == expected
        truncated += int(out[-1] == 49407)
    if length == 24:
        assert truncated >= 1  # the fixture exercises the truncation rule (last id replaced by EOT)


def test_tokenize_no_truncate_raises(tok):
    with pytest.raises(ValueError, match="text_length=8"):
        tokenize("a man in a black coat with a red scarf and blue jeans", tok, text_length=8, truncate=False)


def test_cleaning(tok):
    # html entities unescaped twice, whitespace collapsed, lower-cased
    assert tok.encode("A  &amp;quot;Red&amp;quot;\n\tCoat") == tok.encode('a "red" coat')


def test_datasets_read_the_bpe_file_once(monkeypatch):
    """Datasets built without a tokenizer (as build_dataloader builds them: train + gallery text) read the BPE
    vocabulary once between them (building the encoder takes about a second), not once each."""
    import gzip

    from datasets.bases import ImageTextDataset, TextDataset
    from utils import simple_tokenizer

    real_open, opened = gzip.open, []

    def counting_open(path, *a, **k):
        opened.append(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(simple_tokenizer.gzip, "open", counting_open)
    simple_tokenizer.get_tokenizer.cache_clear()
    train = ImageTextDataset([(0, 0, "unused.png", "a man in a red coat")], check_files=False)
    val = TextDataset([0, 1], ["a man in a red coat", "a woman with a bag"])
    test = TextDataset([2], ["a child"])
    assert opened == [default_bpe()]
    assert train.caption_ids[0].tolist() == val.caption_ids[0].tolist() != test.caption_ids[0].tolist()


def test_missing_bpe_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        SimpleTokenizer(str(tmp_path / "nope.txt.gz"))
