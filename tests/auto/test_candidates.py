"""The chain space and the anytime store."""

from __future__ import annotations

import json

import lmcompress
from lmcompress.auto.candidates import Chain, Structure, chains, chains_of, refined, structures
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


def test_a_refined_structure_is_scored_as_every_quantization_variant():
    """The search scores a built structure through `chains_of`: a refined fraction, which `chains(target)` does
    not list, still gets its float and int8 chains (before this, a refined structure was built and never scored,
    and the search ended with minutes left)."""
    finer = refined(structures("latency"), Structure("prune", 0.3))
    assert finer == Structure("prune", 0.26) and all(c.structure != finer for c in chains("latency"))
    assert chains_of(finer, "latency") == [Chain(finer, "int8"), Chain(finer)]
    assert [c for c in chains("latency") if c.structure == Structure("prune", 0.4)] == chains_of(
        Structure("prune", 0.4), "latency")


def test_the_search_scores_a_refined_structure_it_builds(monkeypatch):
    import time
    from types import SimpleNamespace

    from torch import nn

    from lmcompress.auto.search import Search
    from lmcompress.engine import pipeline

    monkeypatch.setattr(pipeline, "compress", lambda *args, **kwargs: None)
    search = Search.__new__(Search)
    search.ctx = SimpleNamespace(dense=nn.Linear(2, 2), target="latency", batch_size=8, seq_len=128, labels=True,
                                 calibration_settings=None, tokenizer=None, calibration=None)
    search.started, search.budget_s, search.reserve_s = time.perf_counter(), 1000.0, 0.0
    search.build_s, search.eval_s = [], []
    scored = []
    monkeypatch.setattr(Search, "evaluate", lambda self, chain, model, distill_s, rung: scored.append(chain) or chain)
    finer = Structure("prune", 0.26)
    student = search.build(finer)
    assert scored == chains_of(finer, "latency") and student.results == scored
