"""Word n-gram features for the DAN student: counting, a frequency-limited vocabulary or a hashed table, and a
tokenizer-like call (`featurizer(texts, pairs, padding=True, return_tensors="pt")`) so that every place that
batches text for a transformer (evaluation, timing, the sweep) batches it for the DAN the same way.

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


def words(text: str, lowercase: bool = True) -> list[str]:
    return _WORDS.findall(text.lower() if lowercase else text)


def ngrams(tokens: Sequence[str], order: int, prefix: str = "") -> list[str]:
    """Every n-gram of `tokens` for n = 1..order, joined by spaces (`prefix` marks a pair's second text)."""
    return [prefix + " ".join(tokens[i:i + n]) for n in range(1, order + 1) for i in range(len(tokens) - n + 1)]


class NgramFeaturizer:
    """Maps text to n-gram ids: either a kept vocabulary (`vocab`) or a hashed table of `hash_size` buckets."""

    def __init__(self, order: int, vocab: dict[str, int] | None = None, hash_size: int | None = None,
                 lowercase: bool = True) -> None:
        if (vocab is None) == (hash_size is None):
            raise ValueError("give a vocabulary or a hash size")
        if vocab is not None and not vocab:
            raise DataError("the n-gram vocabulary is empty: the texts have no words (or min_count is too high)")
        self.order, self.vocab, self.hash_size, self.lowercase = order, vocab, hash_size, lowercase
        self.padding_side = "right"   # read by tasks.batching

    @classmethod
    def build(cls, texts: Iterable[str], order: int = 2, table: int = 100_000, hash_size: int | None = None,
              min_count: int = 1, lowercase: bool = True) -> NgramFeaturizer:
        """Count n-grams over `texts` and keep the `table` most frequent (ties: alphabetical), each seen at least
        `min_count` times; with `hash_size` no vocabulary is kept (every n-gram has a bucket)."""
        if order < 1:
            raise DataError(f"n-gram order must be at least 1 (got {order})")
        if hash_size is not None:
            return cls(order, hash_size=hash_size, lowercase=lowercase)
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(ngrams(words(text, lowercase), order))
        kept = sorted((g for g, c in counts.items() if c >= min_count), key=lambda g: (-counts[g], g))[:table]
        return cls(order, vocab={g: i + 1 for i, g in enumerate(kept)}, lowercase=lowercase)

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table (padding row included)."""
        return (self.hash_size if self.vocab is None else len(self.vocab)) + 1

    def ids(self, text: str, pair: str | None = None) -> list[int]:
        grams = ngrams(words(text, self.lowercase), self.order)
        if pair is not None:
            grams += ngrams(words(pair, self.lowercase), self.order, prefix="2|")
        if self.vocab is None:
            return [1 + zlib.crc32(g.encode()) % self.hash_size for g in grams]
        return [i for i in (self.vocab.get(g) for g in grams) if i is not None]

    def __call__(self, texts: str | Sequence[str], pairs: Sequence[str] | None = None, padding: bool = True,
                 truncation: bool = True, max_length: int | None = None, return_tensors: str = "pt",
                 **_: Any) -> dict[str, torch.Tensor]:
        """{"input_ids", "attention_mask"}, padded with 0 on the right. `max_length` counts words (as a
        tokenizer counts tokens): a row keeps at most `order * max_length` features. A text without a single
        word is refused in one line; known-nothing rows (every n-gram unseen) average to zeros."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = []
        for index, text in enumerate(texts):
            if not words(text, self.lowercase) and not (pairs and words(pairs[index], self.lowercase)):
                raise DataError(f"text {index} has no features (no words): {text!r:.60}")
            row = self.ids(text, pairs[index] if pairs is not None else None)
            rows.append(row[:self.order * max_length] if truncation and max_length else row)
        width = max(1, *(len(r) for r in rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "order": self.order, "lowercase": self.lowercase,
                           "hash_size": self.hash_size, "vocab": None if self.vocab is None else list(self.vocab)})

    @classmethod
    def from_json(cls, text: str) -> NgramFeaturizer:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not an lmcompress n-gram vocabulary")
        vocab = data["vocab"]
        return cls(int(data["order"]), None if vocab is None else {g: i + 1 for i, g in enumerate(vocab)},
                   data["hash_size"], bool(data["lowercase"]))

    def save_pretrained(self, directory: Any) -> None:
        """Tokenizer-like: write the vocabulary next to the weights."""
        from pathlib import Path

        (Path(directory) / "ngrams.json").write_text(self.to_json())
