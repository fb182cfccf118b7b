"""Word n-gram features for the DAN student: counting, a frequency-limited vocabulary or a hashed table, and a
tokenizer-like call (`featurizer(texts, pairs, padding=True, return_tensors="pt")`) so that every place that
batches text for a transformer (evaluation, timing, the sweep) batches it for the DAN the same way.

With `subword`, each word also gives fastText-style character n-grams of "<word>" (3..subword characters), marked
"#" so they never meet a word n-gram in the table: an unseen word still shares features with seen ones.

Id 0 is padding; features are 1..vocab_size-1. Hashing uses CRC-32 (stable across processes, unlike `hash`).
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lmcompress.errors import DataError

_WORDS = re.compile(r"\w+|[^\w\s]")
FORMAT = "lmcompress-ngrams/1"
# written only with subword n-grams, so that an older reader refuses them instead of silently leaving them out
SUBWORD_FORMAT = "lmcompress-ngrams/2"
MIN_SUBWORD, MAX_SUBWORD = 3, 6
SUBWORD_MARK = "#"


def words(text: str, lowercase: bool = True) -> list[str]:
    return _WORDS.findall(text.lower() if lowercase else text)


def ngrams(tokens: Sequence[str], order: int, prefix: str = "") -> list[str]:
    """Every n-gram of `tokens` for n = 1..order, joined by spaces (`prefix` marks a pair's second text)."""
    grams = [prefix + t for t in tokens] if prefix else list(tokens)
    for n in range(2, order + 1):
        grams += [prefix + " ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return grams


def subwords(tokens: Sequence[str], longest: int, prefix: str = "") -> list[str]:
    """fastText-style character n-grams of each word wrapped as "<word>", of 3..`longest` characters, marked
    with SUBWORD_MARK (after `prefix`) so that none equals a word n-gram; none when `longest` is 0."""
    grams = []
    for token in tokens:
        wrapped = f"<{token}>"
        grams.extend(prefix + SUBWORD_MARK + wrapped[i:i + n] for n in range(MIN_SUBWORD, longest + 1)
                     for i in range(len(wrapped) - n + 1))
    return grams


def check_subword(subword: int) -> int:
    if subword != 0 and not MIN_SUBWORD <= subword <= MAX_SUBWORD:
        raise DataError(f"subword is the longest character n-gram: 0 (off) or {MIN_SUBWORD}..{MAX_SUBWORD} "
                        f"(got {subword}; the shortest is {MIN_SUBWORD})")
    return subword


def padded_ids(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Rows of feature ids as one tensor, padded with id 0 on the right (at least one column).

    One tensor from padded lists, not one per row: this runs on every batch of text in and every training step."""
    width = max(1, max((len(r) for r in rows), default=0))
    return torch.tensor([list(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)


class NgramFeaturizer:
    """Maps text to n-gram ids: either a kept vocabulary (`vocab`) or a hashed table of `hash_size` buckets."""

    def __init__(self, order: int, vocab: dict[str, int] | None = None, hash_size: int | None = None,
                 lowercase: bool = True, subword: int = 0) -> None:
        if (vocab is None) == (hash_size is None):
            raise ValueError("give a vocabulary or a hash size")
        if vocab is not None and not vocab:
            raise DataError("the n-gram vocabulary is empty: the texts have no words (or min_count is too high)")
        self.order, self.vocab, self.hash_size, self.lowercase = order, vocab, hash_size, lowercase
        self.subword = check_subword(subword)
        self.padding_side = "right"   # read by tasks.batching

    @classmethod
    def build(cls, texts: Iterable[str], order: int = 2, table: int = 100_000, hash_size: int | None = None,
              min_count: int = 1, lowercase: bool = True, subword: int = 0) -> NgramFeaturizer:
        """Count n-grams (and, with `subword`, character n-grams) over `texts` and keep the `table` most frequent
        (ties: alphabetical), each seen at least `min_count` times; with `hash_size` no vocabulary is kept (every
        n-gram has a bucket)."""
        if order < 1:
            raise DataError(f"n-gram order must be at least 1 (got {order})")
        check_subword(subword)
        if hash_size is not None:
            return cls(order, hash_size=hash_size, lowercase=lowercase, subword=subword)
        counts: Counter[str] = Counter()
        for text in texts:
            tokens = words(text, lowercase)
            counts.update(ngrams(tokens, order))
            counts.update(subwords(tokens, subword))
        kept = sorted((g for g, c in counts.items() if c >= min_count), key=lambda g: (-counts[g], g))[:table]
        return cls(order, vocab={g: i + 1 for i, g in enumerate(kept)}, lowercase=lowercase, subword=subword)

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table (padding row included)."""
        return (self.hash_size if self.vocab is None else len(self.vocab)) + 1

    @property
    def features_per_word(self) -> int:
        """About how many ids a word gives (timing feeds this many per token): its n-grams, and the character
        n-grams of a five-letter word when `subword` is on."""
        return self.order + sum(7 - n + 1 for n in range(MIN_SUBWORD, self.subword + 1))

    def grams(self, text: str, prefix: str = "") -> list[str]:
        return self._grams_of(words(text, self.lowercase), prefix)

    def ids(self, text: str, pair: str | None = None) -> list[int]:
        return self._row(words(text, self.lowercase), None if pair is None else words(pair, self.lowercase))

    def _grams_of(self, tokens: list[str], prefix: str = "") -> list[str]:
        grams = ngrams(tokens, self.order, prefix)
        return grams + subwords(tokens, self.subword, prefix) if self.subword else grams

    def _row(self, tokens: list[str], pair_tokens: list[str] | None) -> list[int]:
        """The ids of a text already split into words (split once: this runs on every text in)."""
        grams = self._grams_of(tokens)
        if pair_tokens is not None:
            grams += self._grams_of(pair_tokens, prefix="2|")
        if self.vocab is None:
            return [1 + zlib.crc32(g.encode()) % self.hash_size for g in grams]
        return [i for i in map(self.vocab.get, grams) if i is not None]

    def __call__(self, texts: str | Sequence[str], pairs: Sequence[str] | None = None, padding: bool = True,
                 truncation: bool = True, max_length: int | None = None, return_tensors: str = "pt",
                 **_: Any) -> dict[str, torch.Tensor]:
        """{"input_ids", "attention_mask"}, padded with 0 on the right. `max_length` counts words (as a
        tokenizer counts tokens): a row keeps at most `features_per_word * max_length` features. A text
        without a single word is refused in one line; known-nothing rows (every n-gram unseen) average to zeros."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = []
        for index, text in enumerate(texts):
            tokens = words(text, self.lowercase)
            pair_tokens = None if pairs is None else words(pairs[index], self.lowercase)
            if not tokens and not pair_tokens:
                raise DataError(f"text {index} has no features (no words): {text!r:.60}")
            row = self._row(tokens, pair_tokens)
            rows.append(row[:self.features_per_word * max_length] if truncation and max_length else row)
        ids = padded_ids(rows)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def to_json(self) -> str:
        """Without subwords, exactly the first format (older versions read it); with them, the second."""
        subword = {"format": SUBWORD_FORMAT, "subword": self.subword} if self.subword else {}
        return json.dumps({"format": FORMAT, "order": self.order, "lowercase": self.lowercase,
                           "hash_size": self.hash_size, "vocab": None if self.vocab is None else list(self.vocab),
                           **subword})

    @classmethod
    def from_json(cls, text: str) -> NgramFeaturizer:
        """Either format; a file of the first has no subwords."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") not in (FORMAT, SUBWORD_FORMAT):
            raise ValueError("not an lmcompress n-gram vocabulary")
        vocab = data["vocab"]
        try:
            return cls(int(data["order"]), None if vocab is None else {g: i + 1 for i, g in enumerate(vocab)},
                       data["hash_size"], bool(data["lowercase"]), int(data.get("subword", 0)))
        except DataError as err:   # a subword length no version writes
            raise ValueError(str(err)) from None

    def save_pretrained(self, directory: Any) -> None:
        """Tokenizer-like: write the vocabulary next to the weights."""
        from pathlib import Path

        (Path(directory) / "ngrams.json").write_text(self.to_json())
