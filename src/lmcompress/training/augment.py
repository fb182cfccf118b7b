"""Text augmentation for distillation data, after Tang et al. 2019 ("Distilling task-specific knowledge from BERT
into simple neural networks"): new inputs near the task's own, labelled by the teacher, so that a small student sees
how the teacher's output moves when words are masked, swapped or cut away. A task's training text alone is too
little for a student with millions of free n-gram rows; the paper's BiLSTM gained several points on SST-2 from it.

Rules, applied word by word and then once per copy:
- *mask*: with `p_mask` a word becomes the teacher's mask token (its input says "a word was here"); the student's
  input is cut at that word, so no n-gram spans the gap.
- *replace*: with `p_replace` a word becomes a word drawn from the corpus's word frequencies (the paper draws one of
  the same part of speech; no tagger is used here, so this is the unconditioned version).
- *n-gram*: with `p_ngram` the copy is cut to a random window of 1-5 words.

Hand-written: the rules are a few lines over whitespace-split words, and no library does them for an arbitrary
teacher's mask token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

MAX_NGRAM_WINDOW = 5


@dataclass(frozen=True)
class Augmented:
    """One augmented copy: what the teacher reads, and the student's text as pieces between masked words."""

    teacher_text: str
    student_pieces: tuple[str, ...]


def augment_texts(texts: Sequence[str], copies: int, seed: int = 0, p_mask: float = 0.1, p_replace: float = 0.1,
                  p_ngram: float = 0.25, mask_token: str | None = None) -> list[Augmented]:
    """`copies` augmented versions of each text (fewer where a copy came out equal to its text or empty). Without
    a `mask_token` a masked word is dropped from the teacher's input as well."""
    rng = random.Random(seed)
    corpus = [word for text in texts for word in text.split()]
    out: list[Augmented] = []
    for text in texts:
        original = text.split()
        if not original:
            continue
        for _ in range(copies):
            teacher_words: list[str] = []
            pieces: list[list[str]] = [[]]
            for word in original:
                draw = rng.random()
                if draw < p_mask:
                    if mask_token:
                        teacher_words.append(mask_token)
                    pieces.append([])
                    continue
                if draw < p_mask + p_replace:
                    word = rng.choice(corpus)
                teacher_words.append(word)
                pieces[-1].append(word)
            if rng.random() < p_ngram:
                teacher_words, pieces = _window(teacher_words, pieces, rng, mask_token)
            student = tuple(" ".join(piece) for piece in pieces if piece)
            if not student or teacher_words == original:
                continue
            out.append(Augmented(" ".join(teacher_words), student))
    return out


def _window(teacher_words: list[str], pieces: list[list[str]], rng: random.Random,
            mask_token: str | None) -> tuple[list[str], list[list[str]]]:
    """A random window of 1..5 positions of the copy, cut the same way for the teacher and the student."""
    # positions: one per teacher word; a masked word is a position with no student word (a cut)
    positions: list[tuple[str, str | None]] = []
    for index, piece in enumerate(pieces):
        if index and mask_token:
            positions.append((mask_token, None))
        elif index:
            positions.append(("", None))          # a dropped word: nothing for the teacher either
        positions.extend((word, word) for word in piece)
    length = rng.randint(1, min(MAX_NGRAM_WINDOW, len(positions))) if positions else 0
    start = rng.randint(0, len(positions) - length) if positions else 0
    window = positions[start:start + length]
    words = [t for t, _ in window if t]
    cut: list[list[str]] = [[]]
    for _, student_word in window:
        if student_word is None:
            cut.append([])
        else:
            cut[-1].append(student_word)
    return words, cut
