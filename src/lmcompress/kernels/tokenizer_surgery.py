"""Keep a subset of a tokenizer's vocabulary, renumbered in order, so that text made of kept tokens is
segmented exactly as before.

Works on the fast tokenizer's serialization (`tokenizers` JSON): the vocabulary, the BPE merges, the added
tokens, the post-processor's special-token ids and the padding id are rewritten; everything else
(normalizer, pre-tokenizer, decoder) is kept as it is. Kept ids stay in their original order, so the
old -> new mapping is monotone.

Why segmentation is unchanged:

- WordPiece (BERT, MiniLM ...) matches the longest vocabulary entry greedily from the left. If every piece
  the original produced for a word is kept, no longer match can appear in a smaller vocabulary, so the same
  pieces come out.
- BPE (GPT-2, RoBERTa, Llama ...) applies the lowest-ranked applicable merge until none applies. Every merge
  whose result is kept is kept (in its rank order), together with the components of those merges,
  recursively; a merge that ever fired on a word whose final tokens are kept has a kept result, and
  removing merges that never fired does not change which one fires first. The base alphabet (tokens no
  merge produces: the 256 byte symbols of a byte-level BPE, `<0x..>` byte-fallback tokens) is always kept,
  so any text still tokenizes.

Other models (Unigram, WordLevel) are refused with one line.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lmcompress.errors import RecipeError, first_line

SUPPORTED_MODELS = ("WordPiece", "BPE")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_VOCABULARY_FILES = ("vocab.txt", "vocab.json", "merges.txt")  # superseded by tokenizer.json; never left stale


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's JSON as a dict; RecipeError (one line) for a tokenizer this module cannot prune."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RecipeError(f"vocabulary pruning needs a fast (tokenizers-backed) tokenizer; "
                          f"{type(tokenizer).__name__} has none")
    spec = json.loads(backend.to_str())
    kind = spec.get("model", {}).get("type")
    if kind not in SUPPORTED_MODELS:
        raise RecipeError(f"vocabulary pruning supports WordPiece (BERT, MiniLM ...) and BPE (GPT-2, RoBERTa, "
                          f"Llama ...) tokenizers; {type(tokenizer).__name__} uses a {kind} model")
    return spec


def id_space(spec: dict[str, Any]) -> int:
    """One more than the largest id the tokenizer can produce."""
    ids = list(spec["model"]["vocab"].values()) + [t["id"] for t in spec.get("added_tokens") or []]
    return max(ids, default=-1) + 1


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    """BPE merges as pairs, whichever of the two serializations ('a b' or ['a', 'b']) the file uses."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def _merge_result(model: dict[str, Any], a: str, b: str) -> str:
    """The token a merge produces, as `tokenizers` builds it (a continuing-subword prefix of b is dropped)."""
    prefix = model.get("continuing_subword_prefix") or ""
    return a + b[len(prefix):]


def _processor_ids(processor: dict[str, Any] | None) -> set[int]:
    """Token ids a post-processor inserts (template special tokens, BERT/RoBERTa cls and sep)."""
    if not processor:
        return set()
    kind = processor.get("type")
    if kind == "Sequence":
        return set().union(*(_processor_ids(p) for p in processor.get("processors") or []))
    if kind == "TemplateProcessing":
        return {i for special in (processor.get("special_tokens") or {}).values() for i in special["ids"]}
    return {processor[key][1] for key in ("cls", "sep") if isinstance(processor.get(key), list)}


def _remap_processor(processor: dict[str, Any] | None, old_to_new: dict[int, int]) -> dict[str, Any] | None:
    if not processor:
        return processor
    kind = processor.get("type")
    if kind == "Sequence":
        processor["processors"] = [_remap_processor(p, old_to_new) for p in processor.get("processors") or []]
    elif kind == "TemplateProcessing":
        for special in (processor.get("special_tokens") or {}).values():
            special["ids"] = [old_to_new[i] for i in special["ids"]]
    else:
        for key in ("cls", "sep"):
            if isinstance(processor.get(key), list):
                processor[key] = [processor[key][0], old_to_new[processor[key][1]]]
    return processor


def essential_ids(spec: dict[str, Any]) -> set[int]:
    """Ids every pruned tokenizer keeps: added and special tokens, the unknown token, the ids the
    post-processor and padding insert, and (BPE) the base alphabet."""
    model, vocab = spec["model"], spec["model"]["vocab"]
    ids = {t["id"] for t in spec.get("added_tokens") or []} | _processor_ids(spec.get("post_processor"))
    if model.get("unk_token") in vocab:
        ids.add(vocab[model["unk_token"]])
    if spec.get("padding"):
        ids.add(spec["padding"]["pad_id"])
    if model["type"] == "BPE":
        ids |= {vocab[token] for token in bpe_alphabet(model)}
    return ids


def bpe_alphabet(model: dict[str, Any]) -> list[str]:
    """Tokens no merge produces and that stand for one symbol: the characters (or byte symbols) words are
    split into before merging, with the model's prefix/suffix, and byte-fallback tokens."""
    produced = {_merge_result(model, a, b) for a, b in _merges(model)}
    prefix, suffix = model.get("continuing_subword_prefix") or "", model.get("end_of_word_suffix") or ""

    def symbol(token: str) -> str:
        if prefix and token.startswith(prefix):
            token = token[len(prefix):]
        if suffix and token.endswith(suffix):
            token = token[:-len(suffix)]
        return token

    return [t for t in model["vocab"] if t not in produced
            and (len(symbol(t)) == 1 or (model.get("byte_fallback") and _BYTE_FALLBACK.match(t)))]


def wordpiece_alphabet(spec: dict[str, Any], characters: Iterable[str] | None = None) -> set[int]:
    """WordPiece single-character tokens (`c` and `##c`), for the given characters or all of them: with
    them kept, a word of those characters is spelt out in pieces instead of becoming the unknown token."""
    model, vocab = spec["model"], spec["model"]["vocab"]
    prefix = model.get("continuing_subword_prefix") or ""
    if characters is None:
        return {i for token, i in vocab.items() if len(token.removeprefix(prefix) if prefix else token) == 1}
    return {vocab[token] for c in set(characters) for token in (c, prefix + c) if token in vocab}


def merge_closure(spec: dict[str, Any], ids: Iterable[int]) -> set[int]:
    """`ids` plus, for BPE, the components of every merge producing a kept token, recursively."""
    kept = set(ids)
    model = spec["model"]
    if model["type"] != "BPE":
        return kept
    vocab = model["vocab"]
    producers: dict[int, list[tuple[int, int]]] = {}
    for a, b in _merges(model):
        producers.setdefault(vocab[_merge_result(model, a, b)], []).append((vocab[a], vocab[b]))
    stack = list(kept)
    while stack:
        for pair in producers.get(stack.pop(), ()):
            for part in pair:
                if part not in kept:
                    kept.add(part)
                    stack.append(part)
    return kept


def pruned_spec(spec: dict[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """A copy of `spec` holding only the `kept` ids (ascending), renumbered 0, 1, ... in that order.

    `kept` must include `essential_ids(spec)` and be closed under `merge_closure`.
    """
    old_to_new = {old: new for new, old in enumerate(kept)}
    spec = json.loads(json.dumps(spec))
    model = spec["model"]
    vocab = model["vocab"]
    if model["type"] == "BPE":
        pairs = _merges(model)
        model["merges"] = [merge for merge, (a, b) in zip(model.get("merges") or [], pairs, strict=True)
                           if all(vocab[t] in old_to_new for t in (a, b, _merge_result(model, a, b)))]
    model["vocab"] = {token: old_to_new[i] for token, i in vocab.items() if i in old_to_new}
    for token in spec.get("added_tokens") or []:
        token["id"] = old_to_new[token["id"]]
    spec["post_processor"] = _remap_processor(spec.get("post_processor"), old_to_new)
    if spec.get("padding"):
        spec["padding"]["pad_id"] = old_to_new[spec["padding"]["pad_id"]]
    return spec


def rebuild_tokenizer(tokenizer: Any, spec: dict[str, Any], old_to_new: dict[int, int]) -> Any:
    """A transformers tokenizer of the same class and settings as `tokenizer`, running `spec`.

    It is saved and loaded back with `AutoTokenizer.from_pretrained`, so the object returned is exactly what
    a saved model's directory gives its users.
    """
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="lmcompress-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        folder = Path(tmp)
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        for name in _VOCABULARY_FILES:
            (folder / name).unlink(missing_ok=True)
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():  # older layouts record added tokens by id here too
            config = json.loads(config_file.read_text(encoding="utf-8"))
            if isinstance(config.get("added_tokens_decoder"), dict):
                config["added_tokens_decoder"] = {str(old_to_new[int(i)]): token for i, token
                                                  in config["added_tokens_decoder"].items()
                                                  if int(i) in old_to_new}
                config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        try:
            rebuilt = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RecipeError(f"vocabulary pruning: the pruned {type(tokenizer).__name__} does not load back "
                              f"({first_line(err)})") from None
    rebuilt.name_or_path = tokenizer.name_or_path
    return rebuilt


def word_pieces(backend: Any, text: str) -> list[tuple[str, str]]:
    """(pre-tokenized word, readable form) for each word of `text`, as the tokenizer's model sees them."""
    normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
    if backend.pre_tokenizer is None:
        return [(normalized, normalized)] if normalized else []
    pieces = backend.pre_tokenizer.pre_tokenize_str(normalized)
    return [(piece, normalized[start:end]) for piece, (start, end) in pieces]
