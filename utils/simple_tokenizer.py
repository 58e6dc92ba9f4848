"""CLIP byte-level BPE tokenizer with an extra ``<|mask|>`` token (for IRRA's MLM task).

Same as OpenAI's ``clip/simple_tokenizer.py`` except that the last BPE merge is dropped so that
``<|mask|>`` fits in CLIP's 49408-entry vocabulary: ids 49405 (mask), 49406 (sot), 49407 (eot).
"""
from __future__ import annotations

import gzip
import html
import os
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Tuple

import ftfy
import regex as re
import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
# Number of BPE merges kept from the vocab file: CLIP keeps 49152 - 256 - 2 of them; we drop the last one more
# so that the three special tokens still give a 49408 vocabulary.
_NUM_MERGES = 49152 - 256 - 2 - 1


def default_bpe() -> str:
    """Path of the BPE vocabulary shipped with the repository (``data/bpe_simple_vocab_16e6.txt.gz``)."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo_root, "data", "bpe_simple_vocab_16e6.txt.gz")


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """Reversible map utf-8 byte -> printable unicode char (avoids whitespace/control chars), as in CLIP."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def get_pairs(word: Tuple[str, ...]) -> set:
    """Set of adjacent symbol pairs in ``word`` (a tuple of symbols)."""
    pairs = set()
    prev_char = word[0]
    for char in word[1:]:
        pairs.add((prev_char, char))
        prev_char = char
    return pairs


def basic_clean(text: str) -> str:
    """ftfy fix + HTML unescape twice + strip."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse all whitespace runs to one space, strip."""
    text = re.sub(r"\s+", " ", text)
    return text.strip()


class SimpleTokenizer:
    """CLIP BPE tokenizer; ``encoder`` maps BPE token string -> id (49408 entries)."""

    def __init__(self, bpe_path: Optional[str] = None) -> None:
        bpe_path = bpe_path or default_bpe()
        if not os.path.isfile(bpe_path):
            raise FileNotFoundError(f"BPE vocabulary not found at {bpe_path!r} (expected the CLIP bpe_simple_vocab_16e6.txt.gz)")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1:1 + _NUM_MERGES]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        vocab.extend([MASK_TOKEN, SOT_TOKEN, EOT_TOKEN])
        self.encoder: Dict[str, int] = dict(zip(vocab, range(len(vocab))))
        self.decoder: Dict[int, str] = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache: Dict[str, str] = {t: t for t in (MASK_TOKEN, SOT_TOKEN, EOT_TOKEN)}
        self.pat = re.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|<\|mask\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            re.IGNORECASE,
        )

    def bpe(self, token: str) -> str:
        """Apply the BPE merges to one pre-token; returns space-separated BPE symbols."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: List[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> List[int]:
        """Clean (ftfy, html unescape x2, whitespace, lower) and BPE-encode ``text`` (no SOT/EOT)."""
        bpe_tokens: List[int] = []
        text = whitespace_clean(basic_clean(text)).lower()
        for token in re.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            bpe_tokens.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return bpe_tokens

    def decode(self, tokens: Iterable[int]) -> str:
        """Ids -> text (``</w>`` becomes a space, as CLIP)."""
        text = "".join(self.decoder[int(t)] for t in tokens)
        return bytearray([self.byte_decoder[c] for c in text]).decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache(maxsize=None)
def get_tokenizer(bpe_path: Optional[str] = None) -> SimpleTokenizer:
    """Cached tokenizer (building the encoder takes ~1 s)."""
    return SimpleTokenizer(bpe_path)


def tokenize(caption: str, tokenizer: SimpleTokenizer, text_length: int = 77, truncate: bool = True) -> torch.LongTensor:
    """SOT + BPE ids + EOT, zero-padded to ``text_length`` -> LongTensor[text_length].

    Too long: with ``truncate`` cut to ``text_length`` and the last id replaced by EOT (as the original);
    otherwise a ValueError.
    """
    sot_token = tokenizer.encoder[SOT_TOKEN]
    eot_token = tokenizer.encoder[EOT_TOKEN]
    tokens = [sot_token] + tokenizer.encode(caption) + [eot_token]
    result = torch.zeros(text_length, dtype=torch.long)
    if len(tokens) > text_length:
        if not truncate:
            raise ValueError(
                f"caption is {len(tokens)} tokens long (with SOT/EOT), more than text_length={text_length}; "
                f"pass truncate=True or raise --text_length: {caption[:80]!r}"
            )
        tokens = tokens[:text_length]
        tokens[-1] = eot_token
    result[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return result
