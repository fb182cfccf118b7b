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
    half = Chain(Structure("prune", 0.4), "bf16").recipe("latency", 8, 128, True)
    assert [s.method for s in half.stages] == ["prune", "cast"] and half.stages[1].options == {"dtype": "bfloat16"}
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
    assert chains_of(finer, "latency") == [Chain(finer, "int8"), Chain(finer, "bf16"), Chain(finer)]
    assert chains_of(finer, "latency", ("int8", None)) == [Chain(finer, "int8"), Chain(finer)]   # bf16 left out
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
    search.build_s, search.eval_s, search.quants = [], [], ("int8", "bf16", None)
    scored = []
    monkeypatch.setattr(Search, "evaluate", lambda self, chain, model, distill_s, rung: scored.append(chain) or chain)
    finer = Structure("prune", 0.26)
    student = search.build(finer)
    assert scored == chains_of(finer, "latency") and student.results == scored


def _bare_search(left_s: float, best_distill_s: float):
    """A Search with `left_s` seconds left whose best valid answer is prune 0.3 + int8 distilled `best_distill_s`."""
    import time
    from types import SimpleNamespace

    from lmcompress.auto.proxy import Score
    from lmcompress.auto.search import Result, Search

    search = Search.__new__(Search)
    search.ctx = SimpleNamespace(target="latency", max_drop=1.0, z=1.0, min_gain=0.1,
                                 task=SimpleNamespace(metric="accuracy"), cost=SimpleNamespace(unit="ms"),
                                 store=SimpleNamespace(current="x"))
    search.started, search.budget_s, search.reserve_s = time.perf_counter(), left_s, 0.0
    search.build_s, search.eval_s, search.results, search.models = [1.0], [1.0], [], {}
    search.dense_cost, search.stopped, search.polished, search.quants = 100.0, "", "", ("int8", None)
    search.best = Result(Chain(Structure("prune", 0.3), "int8"), best_distill_s, Score(88.0, 0.5, 0.3), 25.0, 2,
                         True, 0.0)
    search.results.append(search.best)
    return search


def test_time_a_smaller_structure_could_not_use_polishes_the_answer_instead(monkeypatch):
    """With less time left than 6x the answer's distillation, no smaller structure is built: the answer's own
    student is distilled further, and that chain, still valid, replaces its shorter-distilled self even when the
    guard scores it a little lower (the guard's noise, not the extra training, decides between the two)."""
    from torch import nn

    from lmcompress.auto.proxy import Score
    from lmcompress.auto.search import Result, Search, Student

    finer = Structure("prune", 0.26)
    assert not _bare_search(left_s=2000, best_distill_s=400).worth_building(finer)
    assert _bare_search(left_s=2500, best_distill_s=400).worth_building(finer)
    assert _bare_search(left_s=50, best_distill_s=0).worth_building(finer)   # undistilled answer: refining is cheap

    search = _bare_search(left_s=500, best_distill_s=400)
    answer, other = Student(Structure("prune", 0.3), nn.Linear(2, 2), 400.0), Student(finer, nn.Linear(2, 2))
    answer.results, other.results = [search.best], [search.best]
    distilled = []

    def fake_distill(self, student, seconds, first):
        distilled.append((student.structure, first))
        student.distill_s += seconds

    def fake_evaluate(self, chain, model, distill_s, rung):
        result = Result(chain, distill_s, Score(87.8, 0.7, 0.3), 25.0 if chain.quant else 34.0, rung, True, 1.0)
        self._record(result, model)
        return result

    monkeypatch.setattr(Search, "distill", fake_distill)
    monkeypatch.setattr(Search, "evaluate", fake_evaluate)
    monkeypatch.setattr(Search, "_save", lambda self, result, model: None)
    search.polish([other, answer], rung=3)
    assert distilled == [(Structure("prune", 0.3), False)]
    assert search.best.chain == Chain(Structure("prune", 0.3), "int8") and search.best.distill_s > 400
    assert search.best.rung == 3 and search.stopped == "time spent" and "polished prune 0.3" in search.polished


def test_successive_halving_keeps_the_students_closest_to_valid_not_the_cheapest(monkeypatch):
    """After a rung the half that goes on is the half nearest validity: prune 0.4 (0.8 ± 0.39 over a limit of 1)
    goes on, prune 0.3 (1.07 ± 0.37), cheaper but further off, stops."""
    from torch import nn

    from lmcompress.auto.proxy import Score
    from lmcompress.auto.search import Result, Search, Student

    search = _bare_search(left_s=3000, best_distill_s=0)
    search.best = Result(Chain(Structure("prune", 0.55), "int8"), 0.0, Score(88.0, 0.6, 0.3), 30.0, 0, True, 0.0)
    clock = [0.0]
    monkeypatch.setattr(Search, "elapsed", lambda self: clock[0])
    scores = {0.3: Score(87.9, 1.07, 0.37), 0.4: Score(88.2, 0.8, 0.39)}
    costs = {0.3: 18.0, 0.4: 22.0}
    distilled = []

    def fake_distill(self, student, seconds, first):
        distilled.append(student.structure.fraction)
        student.distill_s += seconds
        clock[0] += seconds

    def fake_evaluate(self, chain, model, distill_s, rung):
        fraction = chain.structure.fraction
        result = Result(chain, distill_s, scores[fraction], costs[fraction], rung, False, clock[0])
        self.results.append(result)
        return result

    monkeypatch.setattr(Search, "distill", fake_distill)
    monkeypatch.setattr(Search, "evaluate", fake_evaluate)
    students = []
    for fraction in (0.3, 0.4):
        student = Student(Structure("prune", fraction), nn.Linear(2, 2))
        student.results = [Result(Chain(student.structure, "int8"), 0.0, Score(86.0, 2.0, 0.4), costs[fraction], 0,
                                  False, 0.0)]
        students.append(student)
    search.halving(students)
    assert distilled[:2] == [0.3, 0.4]             # the first rung: both, cheapest first
    assert set(distilled[2:]) == {0.4}             # then only the one closest to valid


def _result(fraction: float | None, cost: float, metric: float = 88.0, distill_s: float = 0.0, quant: str = "bf16"):
    from lmcompress.auto.proxy import Score
    from lmcompress.auto.search import Result

    structure = Structure("prune", fraction) if fraction else Structure()
    return Result(Chain(structure, quant), distill_s, Score(metric, 0.5, 0.3), cost, 0, True, 0.0)


def test_the_answer_is_the_least_compressed_model_within_min_gain_of_the_cheapest():
    """prune 0.3 measured 6% faster than prune 0.4 (the SST-2 runs): within a 10% gain the less compressed one is the
    answer; a 20% gain is worth taking; min_gain 0 is the plain cheapest."""
    from lmcompress.auto.search import choice_order, choose

    p3, p4, p55, dense = _result(0.3, 24.5), _result(0.4, 26.0), _result(0.55, 30.6), _result(None, 100.0, quant=None)
    assert choose([dense, p3, p4, p55], 0.1) is p4
    assert choose([dense, p3, p4, p55], 0.0) is p3
    assert choose([dense, p3, p4, p55], 0.25) is p55          # 24.5 saves under 25% of 30.6
    assert choose([dense, p55], 0.1) is p55                  # 30.6 saves far more than 10% of dense's 100
    assert choice_order([dense, p3, p4, p55], 0.1) == [p4, p3, p55, dense]   # each chosen once the earlier are refused
    # each chain counts once, at its longest distillation; equal costs: the higher guard metric
    longer = _result(0.4, 26.0, metric=87.5, distill_s=300.0)
    assert choose([p3, p4, longer], 0.1) is longer
    twin = _result(0.4, 26.05, metric=88.4, quant="int8")
    assert choose([p3, p4, twin], 0.1) is twin


def test_a_student_within_min_gain_of_the_cheapest_valid_model_gets_no_more_distillation():
    """Once prune 0.4 + bf16 is valid at 26 ms, prune 0.3 + bf16 at 24.5 ms could not become the answer (it would
    save under 10%), so it is no longer promising; at 20 ms it still is."""
    from torch import nn

    from lmcompress.auto.proxy import Score
    from lmcompress.auto.search import Result, Student

    search = _bare_search(left_s=1000, best_distill_s=100)
    search.results = [_result(0.4, 26.0)]
    student = Student(Structure("prune", 0.3), nn.Linear(2, 2))
    student.results = [Result(Chain(student.structure, "bf16"), 100.0, Score(87.5, 1.2, 0.3), 24.5, 1, False, 0.0)]
    assert search.promising(student, slack=2.0) is None and search.shortfall(student) == float("inf")
    student.results[0].cost = 20.0
    assert search.promising(student, slack=2.0) == 20.0


def test_the_final_clock_vetoes_inversions_but_does_not_choose_again():
    """The search's choice stands when the final rounds narrow its gain below --min-gain (prune 0.4 + bf16 against
    prune 0.55 + bf16 measured 14% apart in the search and 9.5% in the final rounds); a finalist that the clock
    measures slower than one the search priced higher goes to the end."""
    from lmcompress.auto.confirm import clock_checked
    from lmcompress.auto.search import _key, choice_order

    p4, p55, int8 = _result(0.4, 22.0), _result(0.55, 25.4), _result(None, 54.0, quant="int8")
    order = choice_order([p4, p55, int8], 0.1)
    assert order == [p4, p55, int8]
    narrowed = {_key(p4): {"median_ms": 25.8}, _key(p55): {"median_ms": 28.5}, _key(int8): {"median_ms": 60.0}}
    assert clock_checked(order, narrowed) == [p4, p55, int8]
    inverted = {**narrowed, _key(p4): {"median_ms": 29.0}}
    assert clock_checked(order, inverted) == [p55, int8, p4]
    slower_than_int8 = {**narrowed, _key(p4): {"median_ms": 61.0}, _key(p55): {"median_ms": 62.0}}
    assert clock_checked(order, slower_than_int8)[0] is int8
