"""Plain-text data for the `language-modeling` task: one text file, or a WikiText-style folder.

A folder holds `wiki.valid.*` and `wiki.test.*` (`.raw` preferred over `.tokens`): split "train" reads the
validation file (calibration), "dev" and "test" read the test file (perplexity), so calibrating never sees
the text the model is scored on. A single file serves every split as it is. Documents are the file's
non-empty lines, in order.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmcompress.errors import DataError
from lmcompress.tasks.spec import Examples

_SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("wiki.valid.raw", "wiki.valid.tokens", "valid.txt"),
    "dev": ("wiki.test.raw", "wiki.test.tokens", "test.txt"),
}
_SPLIT_ALIASES: dict[str, str] = {"train": "train", "dev": "dev", "test": "dev"}


def text_file(data: str | os.PathLike | None, split: str) -> Path:
    """The file holding `split`: `data` itself, or the split's file inside a folder."""
    key = _SPLIT_ALIASES.get(split.strip().lower())
    if key is None:
        raise DataError(f"unknown split '{split}' for language modeling; use 'train' (reads wiki.valid.*) or "
                        "'dev'/'test' (reads wiki.test.*)")
    if data is None or str(data) == "embedded" or str(data).startswith("hf:"):
        raise DataError("task 'language-modeling' needs --data: a plain text file or a folder with "
                        "wiki.valid.raw and wiki.test.raw (or .tokens)")
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_file():
        return path
    for name in _SPLIT_FILES[key]:
        if (path / name).is_file():
            return path / name
    raise DataError(f"{path}: no file for split '{split}' (looked for {', '.join(_SPLIT_FILES[key])})")


def read_documents(data: str | os.PathLike | None, split: str) -> tuple[list[str], str]:
    """(non-empty lines, source path) of one split; lines keep their own spacing, only line ends go."""
    path = text_file(data, split)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    documents = [line for line in text.splitlines() if line.strip()]
    if not documents:
        raise DataError(f"no text in {path} (only empty lines)")
    return documents, str(path)


def text_examples(data: str | os.PathLike | None, split: str, max_samples: int | None = None) -> Examples:
    """The split's documents as unlabelled examples; `max_samples` keeps the first ones (the text stays whole,
    in order, rather than a random subset of lines)."""
    documents, _ = read_documents(data, split)
    documents = documents[:max_samples]
    return Examples(documents, None, [None] * len(documents), None)


def token_chunks(tokenizer, examples: Examples, max_length: int) -> Examples:
    """Calibration examples for a language model: the documents as one token stream, cut into pieces that
    encode back to about `max_length` tokens (special tokens included).

    Calibrating on full windows of running text matches what the model sees when it is scored; one short
    line per example would mostly show it the first tokens of a context. Pieces are decoded back to text
    because calibration batches are built from text (and `vocab` reads text).
    """
    size = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if size < 1:
        raise DataError(f"calibration max_length {max_length} leaves no room for text after special tokens")
    ids = tokenizer("\n".join(examples.texts), add_special_tokens=False, verbose=False)["input_ids"]
    pieces = [tokenizer.decode(ids[start:start + size], clean_up_tokenization_spaces=False)
              for start in range(0, len(ids), size)]
    pieces = [piece for piece in pieces if piece.strip()]
    if not pieces:
        raise DataError("the calibration text has no tokens")
    return Examples(pieces, None, [None] * len(pieces), None)
