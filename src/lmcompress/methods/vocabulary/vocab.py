"""`vocab`: keep only the tokens the task's text uses, in the word embedding, output head and tokenizer.

The kept tokens are those the original tokenizer produces on the corpus (`min_count` times or more) plus the
special and added tokens, the ids the model's config names (pad, bos, eos ...), `keep_tokens`, and the
single-character tokens that keep unseen words spellable (see `keep_alphabet`; a BPE tokenizer always keeps
its base alphabet and, for every kept token, the merges that build it). Kept ids are renumbered in their
original order. The embedding keeps exactly those rows; an output head over the vocabulary (tied or not,
with its bias) keeps the same rows, so a tied head stays tied. Text whose tokens are all kept gives the
same outputs as before (the head's logits restricted to the kept tokens). The new tokenizer is saved with
the model and loads with `AutoTokenizer.from_pretrained`.

The stage acts on `model.get_input_embeddings()` (its default `targets`); targets that select anything else
are an error.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.errors import DataError, RecipeError
from lmcompress.kernels import tokenizer_surgery as surgery
from lmcompress.methods.base import LayerResult, Method, MethodConfig, ModelResult, register_method

log = logging.getLogger("lmcompress")

# config fields holding token ids the model itself uses (generation, padding, pooling)
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                   "mask_token_id", "unk_token_id", "decoder_start_token_id")
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                            "mask_token")
EXAMPLES = 5          # out-of-vocabulary words shown in the report
VERIFY_TEXTS = 256    # corpus texts re-tokenized to check the new tokenizer
BATCH = 1024          # texts tokenized per call


class VocabConfig(MethodConfig):
    corpus: str | None = Field(
        default=None, description="text whose tokens are kept: a UTF-8 file with one text per line (or, with "
        "`task`, that task's data: its train split); default: every example the stage is given")
    task: str | None = Field(
        default=None, description="read `corpus` and `report_data` as this task's data (GLUE folder, "
        ".tsv/.csv/.jsonl file, datasets folder) instead of text files")
    text_column: str | None = Field(default=None, description="text column for `task` data that needs one")
    min_count: int = Field(default=1, ge=1, description="keep a token seen at least this many times")
    keep_tokens: list[str] = Field(default=[], description="further tokens (vocabulary entries) to keep")
    keep_alphabet: Literal["corpus", "all", "none"] = Field(
        default="corpus", description="WordPiece single-character tokens (c, ##c) kept so unseen words are "
        "spelt out instead of becoming [UNK]: those of the corpus' characters, all, or none (BPE always keeps "
        "its base alphabet)")
    report_data: str | None = Field(
        default=None, description="held-out text (one per line, or with `task` its dev split): report how many "
        "of its tokens fall outside the kept vocabulary and what the new tokenizer makes of those words")

    @model_validator(mode="after")
    def _task_reads_files(self) -> VocabConfig:
        if self.task is None and self.text_column is not None:
            raise ValueError("text_column names a column of `task` data; give task too")
        if self.task is not None and self.corpus is None and self.report_data is None:
            raise ValueError("task says how to read corpus and report_data; give one of them (the stage's own "
                             "data needs no task option)")
        return self


@register_method
class Vocab(Method):
    name = "vocab"
    config_class = VocabConfig
    unit = "model"
    keeps_data_content = True

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def uses_data(self, config: VocabConfig) -> bool:  # type: ignore[override]
        return config.corpus is None

    def default_targets(self, model: nn.Module) -> list[str] | None:
        name = _input_embedding_name(model)
        return None if name is None else [f"^{re.escape(name)}$"]

    def sized_by_budget(self, config: MethodConfig) -> None:
        raise RecipeError("method 'vocab' keeps the tokens its corpus uses and cannot be sized by a budget")

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: VocabConfig,  # type: ignore[override]
                       targets: dict[str, nn.Module], context: Any = None) -> ModelResult:
        if tokenizer is None:
            raise RecipeError("method 'vocab' needs the model's tokenizer")
        spec = surgery.tokenizer_spec(tokenizer)
        name = _input_embedding_name(model)
        if name is None or set(targets) != {name}:
            raise RecipeError(f"method 'vocab' prunes the word embedding ({name or 'none found'}) and nothing else; "
                              f"the stage's targets select {', '.join(sorted(targets))}")
        embedding = model.get_submodule(name)
        rows = embedding.num_embeddings
        if surgery.id_space(spec) > rows:
            raise RecipeError(f"the tokenizer has ids up to {surgery.id_space(spec) - 1} but the word embedding "
                              f"{name} has {rows} rows")

        source, texts = _corpus(config, data)
        held_out = None if config.report_data is None else _read_texts(config.report_data, config, "dev",
                                                                        "report data")
        counts = _token_counts(tokenizer, texts)
        if not counts:
            raise DataError(f"vocabulary corpus ({source}) gives no tokens")
        seen = {i for i, c in counts.items() if c >= config.min_count}
        kept_set = (seen | surgery.essential_ids(spec) | _config_ids(model, rows) | _keep_token_ids(spec, config)
                    | _alphabet(spec, config, texts, tokenizer))
        if embedding.padding_idx is not None:
            kept_set.add(embedding.padding_idx)
        kept = sorted(surgery.merge_closure(spec, kept_set))
        old_to_new = {old: new for new, old in enumerate(kept)}

        new_tokenizer = surgery.rebuild_tokenizer(tokenizer, surgery.pruned_spec(spec, kept), old_to_new)
        _verify(tokenizer, new_tokenizer, texts, set(kept), old_to_new)
        layers = _shrink_model(model, name, kept, old_to_new)

        report: dict[str, Any] = {
            "corpus": source, "corpus_texts": len(texts), "corpus_tokens": sum(counts.values()),
            "corpus_distinct_tokens": len(counts), "below_min_count": len(counts) - len(seen),
            "tokens_before": rows, "tokens_kept": len(kept),
            "params_before": sum(r.params_before for r in layers), "params_after": sum(r.params_after for r in layers),
            "untied_head": len(layers) > 1,
        }
        if held_out is not None:
            report["report_data"] = _oov_report(tokenizer, new_tokenizer, held_out, set(kept))
        log.info("%s", _summary_line(report, name))
        return ModelResult(layers=layers, tokenizer=new_tokenizer, report=report)


def _input_embedding_name(model: nn.Module) -> str | None:
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return next((n for n, m in model.named_modules() if m is embedding and n), None)


def _read_texts(path: str, config: VocabConfig, split: str, what: str) -> list[str]:
    """Texts from a one-per-line UTF-8 file, or (with `task`) from that task's data."""
    if config.task is not None:
        from lmcompress.tasks import get_task, load_examples

        # the label column is only a placeholder that get_task wants for text-classification: labels are not read
        task = get_task(config.task, text_column=config.text_column, label_column="label")
        texts = _example_texts(load_examples(task, path, split, labels=False))
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"{what} file not found: {file}")
        try:
            content = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{what} {file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        texts = [line.rstrip("\r") for line in content.split("\n") if line.strip()]
    if not texts:
        raise DataError(f"{what} {path} has no text (expected one text per line)" if config.task is None
                        else f"{what} {path} has no text")
    return texts


def _example_texts(examples: Any) -> list[str]:
    texts = list(examples.texts) + list(examples.text_pairs or [])
    return [t for t in texts if t and t.strip()]


def _corpus(config: VocabConfig, data: Any) -> tuple[str, list[str]]:
    if config.corpus is not None:
        return config.corpus, _read_texts(config.corpus, config, "train", "vocabulary corpus")
    texts = _example_texts(data)
    if not texts:
        raise DataError("vocabulary corpus (the stage's data) has no text")
    return f"the stage's data ({len(data):,} examples)", texts


def _encode(tokenizer: Any, texts: Sequence[str], special: bool = False) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), BATCH):
        batch = list(texts[start:start + BATCH])
        ids.extend(tokenizer(batch, add_special_tokens=special, truncation=False, padding=False)["input_ids"])
    return ids


def _token_counts(tokenizer: Any, texts: Sequence[str]) -> Counter[int]:
    counts: Counter[int] = Counter()
    for ids in _encode(tokenizer, texts):
        counts.update(ids)
    return counts


def _config_ids(model: nn.Module, rows: int) -> set[int]:
    ids: set[int] = set()
    for holder in _token_id_holders(model):
        for field in TOKEN_ID_FIELDS:
            value = getattr(holder, field, None)
            for i in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(i, int) and 0 <= i < rows:
                    ids.add(i)
    return ids


def _token_id_holders(model: nn.Module) -> list[Any]:
    """The model's config (and its text config when nested) and its generation config."""
    holders = [model.config]
    text_config = getattr(model.config, "get_text_config", lambda: model.config)()
    if text_config is not model.config:
        holders.append(text_config)
    if getattr(model, "generation_config", None) is not None:
        holders.append(model.generation_config)
    return holders


def _keep_token_ids(spec: dict[str, Any], config: VocabConfig) -> set[int]:
    vocab = dict(spec["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens") or []})
    missing = [t for t in config.keep_tokens if t not in vocab]
    if missing:
        raise RecipeError(f"keep_tokens: {', '.join(map(repr, missing[:5]))} not in the tokenizer's vocabulary "
                          "(to keep the tokens of a text, put the text in the corpus)")
    return {vocab[t] for t in config.keep_tokens}


def _alphabet(spec: dict[str, Any], config: VocabConfig, texts: Sequence[str], tokenizer: Any) -> set[int]:
    if spec["model"]["type"] != "WordPiece" or config.keep_alphabet == "none":
        return set()
    if config.keep_alphabet == "all":
        return surgery.wordpiece_alphabet(spec)
    backend = tokenizer.backend_tokenizer
    characters = set()
    for text in texts:
        characters.update(backend.normalizer.normalize_str(text) if backend.normalizer is not None else text)
    return surgery.wordpiece_alphabet(spec, characters)


def _verify(old: Any, new: Any, texts: Sequence[str], kept: set[int], old_to_new: dict[int, int]) -> None:
    """The saved tokenizer must give the remapped ids on text whose tokens are kept, special tokens included."""
    for attribute in SPECIAL_TOKEN_ATTRIBUTES:
        before, after = getattr(old, f"{attribute}_id", None), getattr(new, f"{attribute}_id", None)
        if before is not None and old_to_new.get(before) != after:
            raise RecipeError(f"vocabulary pruning: the rebuilt {type(new).__name__} maps {attribute} to id {after}, "
                              f"expected {old_to_new.get(before)}; this tokenizer is not supported")
    sample = list(texts[:VERIFY_TEXTS])
    for text, before, after in zip(sample, _encode(old, sample, True), _encode(new, sample, True), strict=True):
        if set(before) <= kept and [old_to_new[i] for i in before] != after:
            raise RecipeError(f"vocabulary pruning: the rebuilt {type(new).__name__} segments {text[:60]!r} "
                              "differently from the original; this tokenizer is not supported")


def _shrink_model(model: nn.Module, name: str, kept: list[int], old_to_new: dict[int, int]) -> list[LayerResult]:
    """Keep the `kept` rows of the word embedding and of an output head over the vocabulary (tied or not,
    with its bias); every reference to the old tensors (ties) gets the new ones."""
    old = model.get_submodule(name)
    rows, index = old.num_embeddings, torch.tensor(kept, dtype=torch.long, device=old.weight.device)
    fresh: dict[int, nn.Parameter] = {}

    def pruned(parameter: nn.Parameter) -> nn.Parameter:
        if id(parameter) not in fresh:
            fresh[id(parameter)] = nn.Parameter(parameter.detach().index_select(0, index).clone(),
                                                requires_grad=parameter.requires_grad)
        return fresh[id(parameter)]

    embedding = copy.deepcopy(old, memo={id(old.weight): pruned(old.weight)})  # keeps the class (scaled ...)
    embedding.num_embeddings = len(kept)
    if old.padding_idx is not None:
        embedding.padding_idx = old_to_new[old.padding_idx]
    results = [LayerResult(embedding, rows * old.embedding_dim, len(kept) * old.embedding_dim, name=name,
                           metrics={"tokens_before": rows, "tokens_kept": len(kept)})]

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    if isinstance(head_weight, torch.Tensor) and head_weight.shape[0] == rows:
        tied = head_weight is old.weight
        pruned(head_weight)
        bias = getattr(head, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.shape[0] == rows:
            pruned(bias)
        if not tied:
            head_name = next(n for n, m in model.named_modules() if m is head)
            results.append(LayerResult(head, head_weight.numel(), len(kept) * head_weight.shape[1], name=head_name,
                                       note="output head"))
        else:
            results[0].note = "tied output head pruned with it"

    for module in model.modules():
        for key, child in module._modules.items():
            if child is old:
                module._modules[key] = embedding
        for key, parameter in module._parameters.items():
            if parameter is not None and id(parameter) in fresh:
                module._parameters[key] = fresh[id(parameter)]
                if key == "weight" and hasattr(module, "out_features"):
                    module.out_features = len(kept)
    for holder in _token_id_holders(model):
        for field in TOKEN_ID_FIELDS:
            value = getattr(holder, field, None)
            if isinstance(value, int) and value in old_to_new:
                setattr(holder, field, old_to_new[value])
            elif isinstance(value, (list, tuple)):
                setattr(holder, field, [old_to_new.get(i, i) if isinstance(i, int) else i for i in value])
    model.config.vocab_size = len(kept)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text_config is not model.config and hasattr(text_config, "vocab_size"):
        text_config.vocab_size = len(kept)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.dim() and t.shape[0] == rows]
    if left:
        log.warning("vocab: %s still %s %d rows (the old vocabulary size) and %s not pruned", ", ".join(left[:3]),
                    "have" if len(left) > 1 else "has", rows, "were" if len(left) > 1 else "was")
    return results


def _oov_report(old: Any, new: Any, texts: list[str], kept: set[int]) -> dict[str, Any]:
    """Dev tokens (original tokenizer) outside the kept vocabulary, and what the new tokenizer makes of the
    words they came from: pieces of the kept vocabulary, or the unknown token."""
    total, outside, distinct = 0, 0, set()
    for ids in _encode(old, texts):
        total += len(ids)
        missing = [i for i in ids if i not in kept]
        outside += len(missing)
        distinct.update(missing)
    old_backend, new_backend = old.backend_tokenizer, new.backend_tokenizer
    words: Counter[tuple[str, str]] = Counter()
    for text in texts:
        words.update(surgery.word_pieces(old_backend, text))
    unk = new.unk_token_id
    affected: list[tuple[int, dict[str, Any]]] = []
    resegmented = to_unk = 0
    for (piece, readable), count in words.items():
        before = old_backend.model.tokenize(piece)
        if all(token.id in kept for token in before):
            continue
        after = new_backend.model.tokenize(piece)
        if not after or (unk is not None and any(token.id == unk for token in after)):
            to_unk += count
        else:
            resegmented += count
        affected.append((count, {"word": readable.strip() or readable, "count": count,
                                 "original": [t.value for t in before], "now": [t.value for t in after]}))
    affected.sort(key=lambda item: -item[0])
    return {"texts": len(texts), "tokens": total, "oov_tokens": outside,
            "oov_fraction": round(outside / max(total, 1), 6), "oov_distinct_tokens": len(distinct),
            "oov_words": resegmented + to_unk, "oov_words_resegmented": resegmented, "oov_words_unknown": to_unk,
            "examples": [entry for _, entry in affected[:EXAMPLES]]}


def _summary_line(report: dict[str, Any], name: str) -> str:
    line = (f"vocab: kept {report['tokens_kept']:,} of {report['tokens_before']:,} tokens "
            f"({report['corpus_distinct_tokens']:,} distinct in {report['corpus_texts']:,} texts); {name}"
            f"{' and output head' if report['untied_head'] else ''}: {report['params_before']:,} -> "
            f"{report['params_after']:,} parameters")
    oov = report.get("report_data")
    if oov:
        line += (f"; report data: {oov['oov_tokens']:,} of {oov['tokens']:,} tokens ({oov['oov_fraction']:.2%}) "
                 f"outside, {oov['oov_words']:,} words: {oov['oov_words_resegmented']:,} re-segmented, "
                 f"{oov['oov_words_unknown']:,} unknown")
    return line
