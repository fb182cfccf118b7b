"""Shared by the auto tests: a tiny saved classifier, a small labelled CSV, and latency tables priced by a
formula (no timing in tests: benchmarks time, tests check the logic)."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, save_classifier, write_sentiment_csv
from transformers import BertConfig, BertForSequenceClassification

from lmcompress.evaluation import latency_table as lt
from lmcompress.evaluation.latency_table import LatencyTable


def formula(kind: str, fields: dict, module=None) -> float:
    """Milliseconds proportional to the work, int8 at a third of dense (so quantization and pruning both pay)."""
    if kind == "linear":
        return 1e-4 * fields["inp"] * fields["out"] + 0.01
    if kind == "int8":
        return 3e-5 * fields["inp"] * fields["out"] + 0.01
    if kind == "module":
        scale = 3e-5 if "Quantized" in type(module).__name__ else 1e-4
        return scale * module.flops_per_token() / 2 + 0.01
    if kind == "attention":
        return 0.05 * fields["heads"]
    return 1e-4 * fields["width"]


@pytest.fixture
def fake_table(tmp_path, monkeypatch):
    """Every latency table priced by `formula`; whole-model passes 'timed' as their blocks' formula (factor 1)."""
    monkeypatch.setenv(lt.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(LatencyTable, "measure", lambda self, kind, fields, module=None: formula(kind, fields, module))

    def fake_passes(model, batch_size, seq_len, repeats, warmup=2):
        table = LatencyTable(batch_size=batch_size, seq_len=seq_len, path=None)
        act = lt.activation_name(model)
        blocks = [lt.block_components_ms(table, p, act) for p in lt.block_parts(model)]
        return sum(blocks) + sum(table.module(m) for m in lt.outside_linears(model).values()) + 0.5, blocks

    monkeypatch.setattr(lt, "timed_passes", fake_passes)


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    return save_classifier(BertForSequenceClassification(config).eval(), tokenizer, tmp_path / "tiny")


@pytest.fixture
def tiny_csv(tmp_path):
    texts = [f"{s} {w}" for w in ("indeed", "truly", "today", "again", "really", "honestly", "somehow", "still")
             for s in SENTENCES]
    return write_sentiment_csv(tmp_path / "data.csv", texts)
