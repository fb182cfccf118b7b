"""The default task: generated English sentiment sentences, so lmcompress runs end to end without any data.

Sentences are short reviews of films, products and meals built from a small grammar: positive/negative
adjectives and verbs, intensifiers ("very", "somewhat" ...), negation ("not", "never", "hardly"; it flips the
label), contrast ("X, but Y" and "although X, Y" take the label of Y), and double negation ("it is not true
that the soup was not tasty" is positive). The label must be worked out from structure, not single words, so
compression damage shows up as lost accuracy.

Train and dev use different seeds, and dev uses a harder mix: more double negation, more negated contrast,
a construction that is rare in train ("Y, even though X") and words that are rare in train. About 8% of the
labels are flipped (seeded) so no model can reach 100% and scores are not saturated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmcompress.tasks.spec import RawRows

TRAIN_SIZE = 2000
DEV_SIZE = 600
TRAIN_SEED = 0
DEV_SEED = 1
NOISE_RATE = 0.08
LABEL_NAMES: tuple[str, ...] = ("negative", "positive")

SUBJECTS: tuple[str, ...] = (
    "the movie", "this film", "the sequel", "the documentary", "the plot", "the acting", "the soundtrack",
    "the ending", "the phone", "this laptop", "the blender", "the headphones", "the battery", "the camera",
    "this vacuum", "the keyboard", "the pasta", "the soup", "the burger", "the dessert", "the coffee",
    "this restaurant", "the service", "the salad",
)
# (common words, words rare in train) per polarity: index 0 negative, 1 positive.
ADJECTIVES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("bad", "awful", "terrible", "boring", "disappointing", "dull", "mediocre", "annoying", "bland", "poor"),
     ("dreadful", "atrocious", "insipid", "lousy")),
    (("good", "great", "wonderful", "excellent", "delightful", "enjoyable", "impressive", "charming",
      "pleasant", "solid"), ("superb", "magnificent", "splendid", "stellar")),
)
# (past tense, base form) for "I <verb> the film".
LIKING_VERBS: tuple[tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]], ...] = (
    ((("hated", "hate"), ("disliked", "dislike"), ("regretted", "regret")), (("despised", "despise"),)),
    ((("loved", "love"), ("enjoyed", "enjoy"), ("liked", "like")), (("adored", "adore"),)),
)
# (past tense, base form) for "the film <verb> me".
EFFECT_VERBS: tuple[tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]], ...] = (
    ((("bored", "bore"), ("disappointed", "disappoint"), ("annoyed", "annoy"), ("frustrated", "frustrate")),
     (("irritated", "irritate"),)),
    ((("impressed", "impress"), ("delighted", "delight"), ("pleased", "please"), ("satisfied", "satisfy")),
     (("amazed", "amaze"),)),
)
INTENSIFIERS: tuple[str, ...] = ("", "", "very ", "really ", "extremely ", "somewhat ", "quite ")
NEGATED_INTENSIFIERS: tuple[str, ...] = ("", "", "very ", "really ", "particularly ")
NEGATIONS: tuple[str, ...] = ("not", "never", "hardly")
WRAPPERS: tuple[str, ...] = ("it is not true that", "I would not say that", "nobody could claim that")
OPENERS: tuple[str, ...] = ("", "", "", "honestly, ", "overall, ", "to be fair, ", "in short, ")


@dataclass(frozen=True)
class _Mix:
    """How often each construction appears; dev uses a harder mix than train."""

    contrast: float
    reversed_contrast: float
    negation: float
    double_negation: float
    rare_words: float


TRAIN_MIX = _Mix(contrast=0.25, reversed_contrast=0.02, negation=0.25, double_negation=0.04, rare_words=0.03)
DEV_MIX = _Mix(contrast=0.30, reversed_contrast=0.12, negation=0.35, double_negation=0.15, rare_words=0.30)


def _word(rng: random.Random, table: tuple, polarity: int, mix: _Mix):
    common, rare = table[polarity]
    return rng.choice(rare if rng.random() < mix.rare_words else common)


def _adjective_clause(rng: random.Random, polarity: int, negated: bool, mix: _Mix) -> str:
    subject, verb = rng.choice(SUBJECTS), rng.choice(("was", "is"))
    adjective = _word(rng, ADJECTIVES, polarity, mix)
    if not negated:
        return f"{subject} {verb} {rng.choice(INTENSIFIERS)}{adjective}"
    negation = rng.choice(NEGATIONS)
    intensifier = rng.choice(NEGATED_INTENSIFIERS) if negation == "not" else ""
    return f"{subject} {verb} {negation} {intensifier}{adjective}"


def _liking_clause(rng: random.Random, polarity: int, negated: bool, mix: _Mix) -> str:
    past, base = _word(rng, LIKING_VERBS, polarity, mix)
    subject = rng.choice(SUBJECTS)
    if not negated:
        return f"I {rng.choice(('', 'really ', 'truly ', 'absolutely '))}{past} {subject}"
    return rng.choice((f"I did not {base} {subject}", f"I never {past} {subject}", f"I hardly {past} {subject}"))


def _effect_clause(rng: random.Random, polarity: int, negated: bool, mix: _Mix) -> str:
    past, base = _word(rng, EFFECT_VERBS, polarity, mix)
    subject = rng.choice(SUBJECTS)
    if not negated:
        return f"{subject} {rng.choice(('', 'really ', 'completely '))}{past} me"
    return rng.choice((f"{subject} did not {base} me", f"{subject} never {past} me",
                       f"{subject} hardly {past} me"))


def _plain_clause(rng: random.Random, polarity: int, negated: bool, mix: _Mix) -> str:
    """A clause whose words have `polarity`; if negated, the clause means the opposite."""
    build = rng.choice((_adjective_clause, _adjective_clause, _liking_clause, _effect_clause))
    return build(rng, polarity, negated, mix)


def _wrapped_clause(rng: random.Random, label: int, mix: _Mix) -> str:
    """'it is not true that <clause>': the wrapper flips; a negated inner clause makes a double negation."""
    inner_negated = rng.random() < 0.7
    inner_label = 1 - label
    inner = _plain_clause(rng, inner_label ^ inner_negated, inner_negated, mix)
    return f"{rng.choice(WRAPPERS)} {inner}"


def _clause(rng: random.Random, label: int, mix: _Mix) -> str:
    """Any clause that means `label`."""
    if rng.random() < mix.double_negation:
        return _wrapped_clause(rng, label, mix)
    negated = rng.random() < mix.negation
    return _plain_clause(rng, label ^ negated, negated, mix)


def _sentence(rng: random.Random, mix: _Mix) -> tuple[str, int]:
    """One sentence and its true label (before noise); with contrast the main clause decides."""
    label = rng.randrange(2)
    main = _clause(rng, label, mix)
    other = _clause(rng, 1 - label if rng.random() < 0.85 else label, mix)
    roll = rng.random()
    if roll < mix.reversed_contrast:
        text = f"{main}, even though {other}"
    elif roll < mix.reversed_contrast + mix.contrast:
        text = rng.choice((f"{other}, but {main}", f"although {other}, {main}"))
    else:
        text = rng.choice(OPENERS) + main
    return text[0].upper() + text[1:] + ".", label


def generate_sentiment(n: int, seed: int, *, hard: bool = False) -> list[tuple[str, int]]:
    """`n` (sentence, label) pairs, identical for identical arguments; `hard` uses the dev mix."""
    rng = random.Random(seed)
    mix = DEV_MIX if hard else TRAIN_MIX
    examples = []
    for _ in range(n):
        text, label = _sentence(rng, mix)
        if rng.random() < NOISE_RATE:
            label = 1 - label
        examples.append((text, label))
    return examples


def embedded_split(split: str) -> list[tuple[str, int]]:
    """The fixed train or dev split of the default task."""
    if split == "train":
        return generate_sentiment(TRAIN_SIZE, TRAIN_SEED)
    return generate_sentiment(DEV_SIZE, DEV_SEED, hard=True)


def embedded_rows(split: str) -> RawRows:
    """The split as rows for the shared label mapping (labels spelled out, so any model naming maps)."""
    pairs = embedded_split(split)
    return RawRows(
        source=f"embedded-sentiment ({split})",
        texts=[text for text, _ in pairs],
        text_pairs=None,
        labels=[LABEL_NAMES[label] for _, label in pairs],
        locations=[f"example {i}" for i in range(len(pairs))],
        label_names=LABEL_NAMES,
    )
