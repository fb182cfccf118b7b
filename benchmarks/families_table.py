"""Which operation works on which model family: the coverage table of docs/families.md.

    python benchmarks/families_table.py            # prints the table
    python benchmarks/families_table.py --write    # and replaces it in docs/families.md

For every `Family` entry of lmcompress.core.families (one row per entry, built from its first model type that has
a config below) and every model type other engineers are adding, a tiny random sequence classifier is built from
a config (nothing downloaded) and each operation is tried at its mildest setting: every registered method,
sequential calibration, a stage budget, a chained recipe, exact save/load, evaluate, ONNX export. A cell says
"works", or "refused" with the one-line reason (numbered below the table), or "FAILS" with the error (a bug: an
operation must work or refuse in one line). A model type without an anatomy entry is one "no anatomy entry" row.
Takes a few minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmcompress.calibration.settings import Calibration
from lmcompress.core.families import FAMILIES, family_of
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import LMCompressError, first_line
from lmcompress.io.models import bundled_model_path, load_tokenizer
from lmcompress.methods import available_methods
from lmcompress.tasks import Examples

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "families.md"
BEGIN, END = "<!-- families table: begin -->", "<!-- families table: end -->"
CALIBRATION = Calibration(samples=8, batch_size=4, max_length=16)
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
         "max_position_embeddings": 128}
# tiny configs by model type; the families other engineers are adding are listed so that their rows appear
CONFIGS: dict[str, dict[str, Any]] = {
    "bert": SMALL, "roberta": SMALL, "xlm-roberta": SMALL, "electra": {**SMALL, "embedding_size": 32},
    "camembert": SMALL,
    "distilbert": {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4, "max_position_embeddings": 128},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "llama": {**SMALL, "num_key_value_heads": 2}, "mistral": {**SMALL, "num_key_value_heads": 2},
    "qwen2": {**SMALL, "num_key_value_heads": 2},
    "t5": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
    "mt5": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
    "bart": {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
             "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
             "max_position_embeddings": 128, "forced_eos_token_id": None},
    "deberta-v2": SMALL, "mpnet": SMALL, "albert": {**SMALL, "embedding_size": 32},
    "opt": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 64,
            "word_embed_proj_dim": 32, "max_position_embeddings": 128},
    "qwen3": {**SMALL, "num_key_value_heads": 2, "head_dim": 8}, "gemma": {**SMALL, "num_key_value_heads": 2,
                                                                           "head_dim": 8},
    "gemma2": {**SMALL, "num_key_value_heads": 2, "head_dim": 8}, "gpt_neox": SMALL,
    "phi3": {**SMALL, "num_key_value_heads": 2}, "modernbert": {**SMALL, "global_attn_every_n_layers": 1},
}
# a method's mildest setting where its defaults do not fit a 2-layer, 32-wide model
SETTINGS: dict[str, dict[str, Any]] = {
    "svd": {"rank": 4}, "whitened_svd": {"rank": 4}, "fisher_svd": {"rank": 4},
    "kronecker": {"terms": 2}, "whitened_kronecker": {"terms": 2},
    "tensor_train": {"rank": 4}, "whitened_tensor_train": {"rank": 4, "steps": 0},
    "quantize": {"bits": 8}, "sparsify": {"sparsity": 0.5, "score": "magnitude"}, "prune": {"keep": 0.5},
    "drop_blocks": {"count": 1, "score": "last"}, "vocab": {},
    "distill": {"time": 0.2, "checkpoints": 1, "batch_size": 8, "eval_batch_size": 8, "max_length": 16},
    "learned": {"structure": "ffn", "width": 32, "epochs": 0},
}
TEXTS = ["the film was wonderful", "a dull, lifeless plot", "i would not watch this again", "surprisingly good",
         "the soup was cold", "an absolute masterpiece", "terrible sound", "it is fine, nothing more"]


def tiny_model(model_type: str, tokenizer) -> torch.nn.Module:
    """A tiny random two-class classifier of `model_type` (ids set so pooling on EOS/pad works)."""
    import transformers

    torch.manual_seed(0)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.sep_token_id,
           "bos_token_id": tokenizer.cls_token_id, "decoder_start_token_id": tokenizer.pad_token_id}
    config = transformers.AutoConfig.for_model(model_type, vocab_size=tokenizer.vocab_size, num_labels=2,
                                               id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
                                               **ids, **CONFIGS[model_type])
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def examples() -> Examples:
    return Examples(TEXTS, None, [i % 2 for i in range(len(TEXTS))], ("neg", "pos"))


def _compress(model, tokenizer, recipe: Recipe) -> Any:
    return compress(model, recipe, tokenizer, examples(), progress=False, timing=False)


def operations(tokenizer) -> dict[str, Callable[[torch.nn.Module], Any]]:
    """Column name -> what to try on a fresh model."""
    ops: dict[str, Callable] = {}
    for method in available_methods():
        ops[method] = (lambda m, method=method: _compress(m, tokenizer, Recipe.single(
            method, calibration=CALIBRATION, **SETTINGS.get(method, {}))))
    ops["sequential"] = lambda m: _sequential(m, tokenizer)
    ops["budget"] = lambda m: _compress(m, tokenizer, Recipe.single(
        "whitened_svd", calibration=CALIBRATION, budget={"params": 0.5}, allocation={"samples": 4}))
    ops["recipe"] = lambda m: _compress(m, tokenizer, Recipe.from_dict({"stages": [
        {"method": "whitened_svd", "options": {"rank": 4}},
        {"method": "quantize", "targets": [r"\.second$"], "options": {"bits": 8}}],
        "calibration": CALIBRATION.model_dump()}))
    ops["save/load"] = lambda m: _save_load(m, tokenizer)
    ops["evaluate"] = lambda m: _evaluate(m, tokenizer)
    ops["onnx"] = lambda m: _onnx(m, tokenizer)
    return ops


def _sequential(model, tokenizer) -> None:
    summary = _compress(model, tokenizer, Recipe.single("whitened_svd", calibration=CALIBRATION, rank=4))
    if summary.stages[0].calibration_mode != "sequential":
        raise LMCompressError(_fallback_reason(model))


def _fallback_reason(model) -> str:
    family = family_of(model)
    if family is not None and family.no_sequential:
        return family.refusal("sequential calibration", family.no_sequential) + " (falls back to one shot)"
    return "falls back to one-shot calibration"


def _save_load(model, tokenizer) -> None:
    from lmcompress.io.saving import load, save

    recipe = Recipe.single("whitened_svd", calibration=CALIBRATION, rank=4)
    _compress(model, tokenizer, recipe)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        save(model, Path(tmp) / "m", tokenizer, recipe)
        if not torch.equal(load(Path(tmp) / "m")(**batch).logits, model(**batch).logits):
            raise RuntimeError("reloaded outputs differ")


def _evaluate(model, tokenizer) -> None:
    from lmcompress.evaluation import evaluate
    from lmcompress.tasks import get_task

    task = get_task("text-classification", text_column="text", label_column="label")
    evaluate(model, tokenizer, task, examples(), max_length=16, flops_seq_len=16, latency_seq_len=16,
             latency_repeats=1, progress=False)


def _onnx(model, tokenizer) -> None:
    from lmcompress.io.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, tokenizer, Path(tmp) / "onnx")


def row(model_type: str, tokenizer, ops: dict[str, Callable]) -> dict[str, str]:
    """{operation: "works" | "refused: ..." | "FAILS: ..."} for one family."""
    cells = {}
    for name, op in ops.items():
        model = tiny_model(model_type, tokenizer)
        try:
            op(model)
            cells[name] = "works"
        except LMCompressError as err:
            cells[name] = "refused: " + first_line(err)
        except Exception as err:  # noqa: BLE001 - the table reports bugs rather than stopping
            cells[name] = f"FAILS: {type(err).__name__}: {first_line(err)}"
        print(f"  {model_type:<12} {name:<22} {cells[name][:110]}", file=sys.stderr)
    return cells


def families() -> list[tuple[str, str]]:
    """(row label, model type to build) for every Family entry, then the types without an entry."""
    rows, known = [], {t for f in FAMILIES for t in f.model_types}
    for family in FAMILIES:
        built = next((t for t in family.model_types if t in CONFIGS), None)
        if built is not None:
            rows.append((", ".join(family.model_types), built))
    rows += [(t, t) for t in CONFIGS if t not in known]
    return rows


def table(tokenizer) -> str:
    ops = operations(tokenizer)
    head = "| family | " + " | ".join(ops) + " |"
    lines, reasons = [head, "|---" * (len(ops) + 1) + "|"], []
    for label, model_type in families():
        if family_of(tiny_model(model_type, tokenizer)) is None:
            lines.append(f"| {label} | no anatomy entry | " + " | ".join(["-"] * (len(ops) - 1)) + " |")
            continue
        cells = []
        for value in row(model_type, tokenizer, ops).values():
            if value == "works":
                cells.append("works")
                continue
            if value not in reasons:
                reasons.append(value)
            cells.append(f"{value.split(':', 1)[0]} ({reasons.index(value) + 1})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = [f"{i}. {reason}".replace("|", "\\|") for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the table in {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    logging.getLogger("lmcompress").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(str(bundled_model_path()))
    text = table(copy.copy(tokenizer))
    print(text)
    if args.write:
        doc = DOC.read_text()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOC.write_text(doc[:start] + "\n" + text + doc[end:])


if __name__ == "__main__":
    main()
