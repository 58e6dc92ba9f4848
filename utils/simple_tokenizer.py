"""CLIP byte-level BPE tokenizer with an extra ``<|mask|>`` token (for IRRA's MLM task).

Same as OpenAI's ``clip/simple_tokenizer.py`` except that the last BPE merge is dropped so that
``<|mask|>`` fits in CLIP's 49408-entry vocabulary: ids 49405 (mask), 49406 (sot), 49407 (eot).
"""
from __future__ import annotations

import gzip
import html
import os
from functools import lru_cache
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import ftfy
import regex as re
import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
# Number of BPE merges kept from the vocab file: CLIP keeps 49152 - 256 - 2 of them; we drop the last one more
# so that the three special tokens still give a 49408 vocabulary.
_NUM_MERGES = 49152 - 256 - 2 - 1
# Longest pre-token (in byte symbols) merged as one word; longer ones are merged in pieces (SimpleTokenizer.bpe).
MAX_BPE_WORD = 256


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
        """Apply the BPE merges to one pre-token; returns space-separated BPE symbols.

        BPE's cost grows with the square of the word's length: a pre-token longer than ``MAX_BPE_WORD`` (no word of
        a caption is) is cut into pieces of that length, each merged on its own (only the last ends the word), so a
        40,000-letter "word" costs linear time. Words up to ``MAX_BPE_WORD`` get CLIP's merges exactly."""
        return " ".join(self._bpe_parts(token))

    def _bpe_parts(self, token: str) -> Iterator[str]:
        """:meth:`bpe` of ``token`` piece by piece (one part for a word up to ``MAX_BPE_WORD``), lazily."""
        if token in self.cache:
            yield self.cache[token]
            return
        if len(token) > MAX_BPE_WORD:  # not cached: such a pre-token is no word
            for i in range(0, len(token), MAX_BPE_WORD):
                yield self._merge(tuple(token[i:i + MAX_BPE_WORD]), end=i + MAX_BPE_WORD >= len(token))
            return
        out = self._merge(tuple(token), end=True)
        self.cache[token] = out
        yield out

    def _merge(self, chars: Tuple[str, ...], end: bool) -> str:
        """CLIP's BPE loop over the symbols ``chars`` (the last one marked ``</w>`` when ``end``)."""
        word = chars[:-1] + (chars[-1] + "</w>",) if end else chars
        pairs = get_pairs(word)
        if not pairs:
            return " ".join(word)
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
        return " ".join(word)

    def encode(self, text: str, max_tokens: Optional[int] = None) -> List[int]:
        """Clean (ftfy, html unescape x2, whitespace, lower) and BPE-encode ``text`` (no SOT/EOT).

        ``max_tokens``: stop once that many ids are found and return the first ``max_tokens`` (the same ids as the
        full encoding's first ones): the cost of a long text is that of its beginning."""
        bpe_tokens: List[int] = []
        text = whitespace_clean(basic_clean(text)).lower()
        for match in re.finditer(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in match.group().encode("utf-8"))
            for part in self._bpe_parts(token):
                bpe_tokens.extend(self.encoder[t] for t in part.split(" "))
                if max_tokens is not None and len(bpe_tokens) >= max_tokens:
                    return bpe_tokens[:max_tokens]
        return bpe_tokens

    def decode(self, tokens: Iterable[int]) -> str:
        """Ids -> text (``</w>`` becomes a space, as CLIP)."""
        text = "".join(self.decoder[int(t)] for t in tokens)
        return bytearray([self.byte_decoder[c] for c in text]).decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache(maxsize=None)
def get_tokenizer(bpe_path: Optional[str] = None) -> SimpleTokenizer:
    """Cached tokenizer (building the encoder takes ~1 s)."""
    return SimpleTokenizer(bpe_path)


def tokenize(caption: str, tokenizer: SimpleTokenizer, text_length: int = 77, truncate: bool = True,
             return_cut: bool = False):
    """SOT + BPE ids + EOT, zero-padded to ``text_length`` -> LongTensor[text_length] (with ``return_cut``:
    ``(ids, whether the caption was cut)``).

    Too long: with ``truncate`` cut to ``text_length`` and the last id replaced by EOT (as the original);
    otherwise a ValueError.
    """
    sot_token = tokenizer.encoder[SOT_TOKEN]
    eot_token = tokenizer.encoder[EOT_TOKEN]
    # with truncate only the first text_length - 1 ids can matter (one more than fit tells that the text is cut)
    tokens = [sot_token] + tokenizer.encode(caption, max_tokens=text_length - 1 if truncate else None) + [eot_token]
    result = torch.zeros(text_length, dtype=torch.long)
    if len(tokens) > text_length:
        if not truncate:
            raise ValueError(
                f"caption is {len(tokens)} tokens long (with SOT/EOT), more than text_length={text_length}; "
                f"pass truncate=True or raise --text_length: {caption[:80]!r}"
            )
        tokens = tokens[:text_length]
        tokens[-1] = eot_token
        cut = True
    else:
        cut = False
    result[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return (result, cut) if return_cut else result
