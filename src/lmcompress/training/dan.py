"""Sparse distillation (Ye et al. 2022): train a DAN student (`layers.dan`) on a fine-tuned classifier's soft
outputs over all available text (the labelled texts plus any unlabelled ones), then optionally on the labels.

Hand-written rather than through `transformers.Trainer`: the embedding table takes sparse gradients (only the rows of
the batch's n-grams move), which needs `torch.optim.SparseAdam` beside a dense optimiser for the rest.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from lmcompress.core.progress import track
from lmcompress.errors import DataError, LMCompressError
from lmcompress.kernels.ngrams import MAX_SUBWORD, NgramFeaturizer, check_subword, padded_ids
from lmcompress.layers.dan import DAN, DANConfig
from lmcompress.training.augment import Augmented, augment_texts
from lmcompress.training.dan_init import InitMode, teacher_rows

log = logging.getLogger("lmcompress")


class DANOptions(BaseModel):
    """`--option KEY=VALUE` of `lmcompress distill --student dan`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ngram: int = Field(default=2, ge=1, le=5, description="n-grams of n = 1..ngram words")
    subword: int = Field(default=0, ge=0, le=MAX_SUBWORD, description="also character n-grams of each word, "
                         "3..subword characters (fastText-style, of \"<word>\"); 0: off")
    table: int = Field(default=200_000, ge=1, description="n-grams kept, most frequent first")
    hash: int | None = Field(default=None, ge=1, description="hash every n-gram into this many rows instead")
    min_count: int = Field(default=1, ge=1, description="drop n-grams seen fewer times")
    dim: int = Field(default=256, ge=1, description="embedding dimension")
    init: InitMode = Field(default="random", description="table rows from: random, the teacher's input "
                           "embeddings of each n-gram's word pieces, or its encoder run on each n-gram")
    hidden: int = Field(default=256, ge=1, description="hidden layer width")
    layers: int = Field(default=1, ge=0, description="hidden layers after the average")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    word_dropout: float = Field(default=0.0, ge=0, lt=1, description="chance each n-gram of a text is left out of "
                                "the average in a training step (Iyyer et al. 2015); one always stays")
    epochs: int = Field(default=5, ge=0, description="passes over all text on the teacher's outputs")
    label_epochs: int = Field(default=0, ge=0, description="passes over the labelled text on its labels afterwards")
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    embedding_lr: float = Field(default=1e-2, gt=0, description="SparseAdam rate of the table")
    temperature: float = Field(default=1.0, gt=0, description="softmax temperature of the soft targets")
    hint: float = Field(default=0.0, ge=0, description="weight of a second target: the teacher's mean-pooled last "
                        "hidden states, standardised, regressed from the DAN's last layer (FitNets-style); 0: off")
    augment: int = Field(default=0, ge=0, description="augmented copies of each text, labelled by the teacher "
                         "(masked, swapped and cut words; Tang et al. 2019); 0: off")
    augment_mask: float = Field(default=0.1, ge=0, le=1, description="chance a word is masked in a copy")
    augment_replace: float = Field(default=0.1, ge=0, le=1, description="chance a word is swapped for a corpus word")
    augment_ngram: float = Field(default=0.25, ge=0, le=1, description="chance a copy is cut to 1-5 words")
    teacher_batch_size: int = Field(default=64, ge=1)
    max_length: int = Field(default=128, ge=1, description="teacher tokens per text")
    seed: int = 0

    @field_validator("subword")
    @classmethod
    def _subword(cls, value: int) -> int:
        try:   # 1 and 2 are refused: the shortest character n-gram is 3
            return check_subword(value)
        except DataError as err:
            raise ValueError(str(err)) from None

    @model_validator(mode="after")
    def _init_needs_vocabulary(self) -> DANOptions:
        if self.init != "random" and self.hash is not None:
            raise ValueError(f"init={self.init} needs a kept n-gram vocabulary; a hashed table has no n-gram per row")
        if self.hint and self.augment:
            raise ValueError("hint and augment do not combine: the augmented copies carry no teacher states")
        return self


@dataclass
class DANResult:
    model: DAN
    report: dict[str, Any] = field(default_factory=dict)


def check_teacher(teacher: nn.Module) -> bool:
    """True for a regressor; a one-line error for anything that is not a sequence classifier."""
    name = type(teacher).__name__
    config = getattr(teacher, "config", None)
    if not name.endswith("ForSequenceClassification") or config is None:
        raise LMCompressError(f"a DAN student distils a sequence classifier or regressor; the teacher is a {name}")
    return getattr(config, "problem_type", None) == "regression" or config.num_labels == 1


def label_augmented(teacher: nn.Module, tokenizer: Any, texts: Sequence[str], options: DANOptions,
                    progress: bool = False) -> tuple[list[Augmented], torch.Tensor]:
    """`options.augment` augmented copies of each text and the teacher's logits for them: computed once, they can be
    passed to several `distill_dan` calls (`augmented=`) whose options differ only in the student."""
    copies = augment_texts(texts, options.augment, options.seed, options.augment_mask, options.augment_replace,
                           options.augment_ngram, mask_token=getattr(tokenizer, "mask_token", None))
    logits = teacher_outputs(teacher, tokenizer, [c.teacher_text for c in copies], options.teacher_batch_size,
                             options.max_length, progress)
    return copies, logits


def _with_augmented(teacher: nn.Module, tokenizer: Any, texts: list[str], featurizer: NgramFeaturizer,
                    features: list[list[int]], logits: torch.Tensor, options: DANOptions,
                    augmented: tuple[list[Augmented], torch.Tensor] | None,
                    progress: bool) -> tuple[list[list[int]], torch.Tensor, int]:
    """Features and soft targets of `texts` followed by those of their augmented copies (copies without a feature
    of the vocabulary are left out), and how many were added. The vocabulary stays the one counted on the real
    text: augmentation adds examples, not n-grams."""
    if augmented is None:
        if not options.augment:
            return features, logits, 0
        augmented = label_augmented(teacher, tokenizer, texts, options, progress)
    copies, copy_logits = augmented
    if len(copies) != len(copy_logits):
        raise DataError(f"{len(copy_logits)} teacher outputs for {len(copies)} augmented copies")
    extra = [[i for piece in item.student_pieces for i in featurizer.ids(piece)] for item in copies]
    kept = [k for k, row in enumerate(extra) if row]
    if not kept:
        return features, logits, 0
    log.info("DAN: %d augmented copies of %d texts, labelled by the teacher", len(kept), len(texts))
    return [*features, *(extra[k] for k in kept)], torch.cat([logits, copy_logits[kept]]), len(kept)


def teacher_outputs(teacher: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 64,
                    max_length: int = 128, progress: bool = False) -> torch.Tensor:
    """The teacher's logits (float32, CPU) for every text, batched by length to waste little on padding."""
    return teacher_targets(teacher, tokenizer, texts, batch_size, max_length, progress)[0]


@torch.inference_mode()
def teacher_targets(teacher: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 64,
                    max_length: int = 128, progress: bool = False,
                    states: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's logits for every text and, with `states`, its last hidden states averaged over each text's
    tokens (float32, CPU): one pass for both targets of a DAN with `hint`."""
    teacher.eval()
    device = next(teacher.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    logits = torch.empty(len(texts), teacher.config.num_labels)
    pooled = torch.empty(len(texts), teacher.config.hidden_size) if states else None
    starts = range(0, len(order), batch_size)
    for start in track(starts, len(starts), "teacher outputs", progress, unit="batch"):
        chunk = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                                       max_length=max_length, return_tensors="pt").items()}
        out = teacher(**batch, output_hidden_states=states)
        logits[chunk] = out.logits.float().cpu()
        if pooled is not None:
            mask = batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)
            pooled[chunk] = ((out.hidden_states[-1] * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu()
    return logits, pooled


def standardised(states: torch.Tensor) -> torch.Tensor:
    """Each dimension at mean 0 and deviation 1 over the texts, so `hint` weighs the same for any teacher."""
    if not torch.isfinite(states).all():
        raise DataError("the teacher's hidden states hold NaN or infinite values")
    return (states - states.mean(0)) / states.std(0).clamp(min=1e-6)


def _batches(features: list[list[int]], order: list[int], size: int):
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        yield chunk, padded_ids([features[i] for i in chunk])


def drop_features(ids: torch.Tensor, rate: float) -> torch.Tensor:
    """`ids` with each feature (not padding) set to padding with chance `rate`, never all of a row's: the DAN's
    word dropout, which makes the average lean on many n-grams rather than a few."""
    present = ids != 0
    dropped = (torch.rand(ids.shape) < rate) & present
    emptied = ~(present & ~dropped).any(1)
    dropped[emptied] = False
    return ids.masked_fill(dropped, 0)


def _optimisers(model: DAN, options: DANOptions, extra: nn.Module | None = None) -> list[torch.optim.Optimizer]:
    dense = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
    dense += [] if extra is None else list(extra.parameters())
    return [torch.optim.SparseAdam(list(model.embedding.parameters()), lr=options.embedding_lr),
            torch.optim.AdamW(dense, lr=options.lr)]


def _epoch(model: DAN, features: list[list[int]], loss_of, options: DANOptions,
           optimisers: list[torch.optim.Optimizer], rng: random.Random) -> float:
    """One pass in random order; `loss_of(model, ids, rows)` is the loss of the batch of texts `rows`."""
    model.train()
    order = list(range(len(features)))
    rng.shuffle(order)
    total = 0.0
    for chunk, ids in _batches(features, order, options.batch_size):
        if options.word_dropout:
            ids = drop_features(ids, options.word_dropout)
        loss = loss_of(model, ids, chunk)
        for opt in optimisers:
            opt.zero_grad()
        loss.backward()
        for opt in optimisers:
            opt.step()
        with torch.no_grad():
            model.embedding.weight[0].zero_()
        total += float(loss.detach()) * len(chunk)
    return total / max(1, len(features))


def distill_dan(teacher: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[Any] | None = None,
                unlabeled: Sequence[str] = (), options: DANOptions | None = None,
                teacher_logits: torch.Tensor | None = None, progress: bool = False,
                augmented: tuple[list[Augmented], torch.Tensor] | None = None,
                teacher_states: torch.Tensor | None = None) -> DANResult:
    """Build the n-gram vocabulary on `texts` + `unlabeled`, train a DAN on the teacher's outputs over all of them
    (`teacher_logits`, one row per text of texts + unlabeled, when already computed), then `label_epochs` on
    `labels` (which belong to `texts`). With `options.augment`, augmented copies of all the text join the soft
    targets (`augmented`: copies and their teacher logits from `label_augmented`, when already computed). With
    `options.hint`, the teacher's pooled states are a second target (`teacher_states` from `teacher_targets`)."""
    options = options or DANOptions()
    regression = check_teacher(teacher)
    everything = [*texts, *unlabeled]
    if not everything:
        raise DataError("no text to distil on")
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    started = time.perf_counter()
    featurizer = NgramFeaturizer.build(everything, options.ngram, options.table, options.hash, options.min_count,
                                       subword=options.subword)
    for index, text in enumerate(everything):
        if not text.strip():
            raise DataError(f"text {index} has no features (it is empty)")
    features = [featurizer.ids(t) for t in everything]
    empty = sum(not row for row in features)
    if empty == len(features):
        raise DataError("no text has a feature of the n-gram vocabulary")
    needs_states = bool(options.hint) and teacher_states is None
    if teacher_logits is None or needs_states:
        teacher_logits, computed = teacher_targets(teacher, tokenizer, everything, options.teacher_batch_size,
                                                   options.max_length, progress, states=needs_states)
        teacher_states = computed if needs_states else teacher_states
    for name, given in (("outputs", teacher_logits), ("states", teacher_states if options.hint else None)):
        if given is not None and len(given) != len(everything):
            raise DataError(f"{len(given)} teacher {name} for {len(everything)} texts")
    features, teacher_logits, added = _with_augmented(teacher, tokenizer, everything, featurizer, features,
                                                      teacher_logits, options, augmented, progress)
    config = DANConfig(vocab_size=featurizer.vocab_size, dim=options.dim, hidden=options.hidden,
                       layers=options.layers, num_labels=teacher.config.num_labels,
                       id2label={int(k): str(v) for k, v in teacher.config.id2label.items()} if not regression else {},
                       problem_type="regression" if regression else "single_label_classification",
                       dropout=options.dropout)
    model = DAN(config, featurizer)
    init_seconds = 0.0
    if options.init != "random":
        rows, init_seconds = teacher_rows(teacher, tokenizer, featurizer, options.init, options.dim, options.seed,
                                          progress)
        with torch.no_grad():
            model.embedding.weight.copy_(rows)
    hint_head = nn.Linear(model.classifier.in_features, teacher_states.shape[1]) if options.hint else None
    hint_targets = standardised(teacher_states) if options.hint else None
    optimisers = _optimisers(model, options, hint_head)
    temperature = options.temperature

    def soft_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if regression:
            return F.mse_loss(logits, target)
        return F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(target / temperature, -1),
                        reduction="batchmean") * temperature ** 2

    def distil_loss(student: DAN, ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if hint_head is None:
            return soft_loss(student(ids).logits, teacher_logits[rows])
        vector = student.represent(ids)
        return soft_loss(student.classifier(vector), teacher_logits[rows]) \
            + options.hint * F.mse_loss(hint_head(vector), hint_targets[rows])

    losses = [_epoch(model, features, distil_loss, options, optimisers, rng) for _ in range(options.epochs)]
    label_losses = []
    if options.label_epochs:
        if labels is None:
            raise DataError("label_epochs needs labelled data")
        target = torch.tensor(list(labels), dtype=torch.float32 if regression else torch.long)
        hard = (lambda lg, y: F.mse_loss(lg.squeeze(-1), y)) if regression else F.cross_entropy
        label_losses = [_epoch(model, features[:len(texts)], lambda m, ids, rows: hard(m(ids).logits, target[rows]),
                               options, optimisers, rng) for _ in range(options.label_epochs)]
    model.eval()
    report = {"texts": len(texts), "unlabeled": len(unlabeled), "augmented": added,
              "vocabulary": featurizer.vocab_size - 1,
              "texts_without_features": empty, "soft_losses": [round(v, 5) for v in losses],
              "label_losses": [round(v, 5) for v in label_losses], "seconds": round(time.perf_counter() - started, 1),
              "init_seconds": round(init_seconds, 1),
              "params": sum(p.numel() for p in model.parameters()), "options": options.model_dump()}
    if any(math.isnan(v) for v in losses):
        raise LMCompressError("DAN training diverged (NaN loss); lower lr or embedding_lr")
    return DANResult(model, report)
