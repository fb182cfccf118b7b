"""The chain space and the anytime store."""

from __future__ import annotations

import json

import lmcompress
from lmcompress.auto.candidates import Chain, Structure, chains, refined, structures
from lmcompress.auto.store import BestStore


def test_each_target_gets_its_chains():
    latency = chains("latency")
    assert Chain(Structure("prune", 0.4), "int8") == latency[0]   # the hand recipe leads
    assert not any(c.quant == "int4" for c in latency)               # int4 runs slower than dense on a CPU
    assert all(c.quant is None for c in chains("flops"))              # quantization leaves FLOPs as they are
    assert Chain(Structure(), "int4") in chains("bytes")


def test_a_chain_is_a_recipe_with_its_budget_distillation_and_quantization():
    recipe = Chain(Structure("prune", 0.4), "int8").recipe("latency", 8, 128, True, distill_s=61.4)
    stages = [s.method for s in recipe.stages]
    assert stages == ["prune", "distill", "quantize"]
    assert recipe.stages[0].budget.fraction == 0.4 and recipe.stages[0].budget.batch_size == 8
    assert recipe.stages[1].options["time"] == "61s"
    assert Chain(Structure("whitened_svd", 0.5)).recipe("bytes", 8, 128, True).stages[0].budget.params == 0.5
    assert Chain(Structure()).recipe("latency", 8, 128, True) is None


def test_refinement_goes_between_the_smallest_valid_fraction_and_the_next_one_tried():
    tried = structures("latency")
    assert refined(tried, Structure("prune", 0.4)) == Structure("prune", 0.35)
    assert refined(tried, Structure()) is None
    assert refined([Structure("prune", 0.4), Structure("prune", 0.39)], Structure("prune", 0.4)) is None


def test_the_store_switches_the_link_and_removes_the_previous_model(tmp_path, tiny_bert, tokenizer):
    store = BestStore(tmp_path)
    first = store.put(tiny_bert, tokenizer, None, {"chain": "dense"})
    second = store.put(tiny_bert, tokenizer, None, {"chain": "int8"})
    assert (tmp_path / "model").resolve() == second.resolve() and not first.exists()
    assert json.loads((tmp_path / "best.json").read_text())["chain"] == "int8"
    assert lmcompress.load(tmp_path / "model") is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
