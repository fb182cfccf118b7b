"""Sweeps: grid expansion, the Pareto front, resuming, reuse of sensitivity scores, Ray, and bad input."""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, SENTENCES, make_tiny_bert, save_classifier, write_sentiment_csv

from lmcompress.cli import main
from lmcompress.errors import RecipeError
from lmcompress.sweep import load_grid, pareto_front
from lmcompress.sweep.report import fronts, markdown


def write(path, text):
    path.write_text(text)
    return path


# --- grids ---------------------------------------------------------------------------------------------


def test_one_recipe_with_lists_expands_to_their_product(tmp_path):
    grid = write(tmp_path / "g.yaml", """
stages:
  - method: whitened_svd
    budget: {params: [0.3, 0.5]}
    allocation: {strategy: [sensitivity, uniform]}
  - method: quantize
    options: {scheme: dynamic}
""")
    points = load_grid(grid)
    assert len(points) == 4
    budgets = sorted((p.recipe.stages[0].budget.params, p.recipe.stages[0].allocation.strategy) for p in points)
    assert budgets == [(0.3, "sensitivity"), (0.3, "uniform"), (0.5, "sensitivity"), (0.5, "uniform")]
    assert all(p.recipe.stages[1].method == "quantize" for p in points)
    assert len({p.point_id for p in points}) == 4
    assert "whitened_svd[params=0.3" in points[0].name and "quantize[scheme=dynamic]" in points[0].name


def test_list_of_recipes_names_and_duplicates(tmp_path):
    grid = write(tmp_path / "g.yaml", """
- name: low rank
  stages: [{method: svd, options: {keep: [0.25, 0.5]}}]
- stages: [{method: svd, options: {keep: 0.5}}]   # the same recipe as the second point: measured once
- stages: [{method: quantize, options: {scheme: dynamic}}]
""")
    points = load_grid(grid)
    assert [p.name for p in points] == ["low rank (keep=0.25)", "low rank (keep=0.5)", "quantize[scheme=dynamic]"]


def test_an_option_that_takes_a_list_expands_only_from_a_list_of_lists(tmp_path):
    single = load_grid(write(tmp_path / "a.yaml", """
stages: [{method: whitened_svd, budget: {params: 0.5}, allocation: {probes: [0.2, 0.6]}}]
"""))
    assert len(single) == 1 and single[0].recipe.stages[0].allocation.probes == [0.2, 0.6]
    several = load_grid(write(tmp_path / "b.yaml", """
stages: [{method: whitened_svd, budget: {params: 0.5}, allocation: {probes: [[0.2, 0.6], [0.1, 0.3]]}}]
"""))
    assert [p.recipe.stages[0].allocation.probes for p in several] == [[0.2, 0.6], [0.1, 0.3]]


@pytest.mark.parametrize("text, message", [
    ("- stages: [{method: svd, options: {keep: 0.5}}]\n- stages: [{method: nosuch}]", "entry 2"),
    ("stages: [{method: svd, options: {keep: [0.5, 1.5]}}]", "keep"),
    ("[]", "empty"),
    ("- 3", "recipe mapping"),
    ("stages: [{method: svd, options: {keep: 0.5}}\n", "not valid YAML"),
])
def test_bad_grids_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message) as info:
        load_grid(write(tmp_path / "g.yaml", text))
    assert "\n" not in str(info.value)


# --- Pareto front ----------------------------------------------------------------------------------------


def test_pareto_front_on_a_synthetic_set():
    #          0    1    2    3    4    5    6
    costs = [10.0, 5.0, 5.0, 2.0, 8.0, 1.0, math.nan]
    quality = [0.9, 0.8, 0.7, 0.8, 0.95, 0.1, 0.99]
    # 2 is dominated by 1 (same cost, worse); 1 by 3 (cheaper, as good); 0 by 4 (cheaper, better); NaN never
    assert pareto_front(costs, quality) == [5, 3, 4]
    # lower is better (perplexity): the cheapest point with the lowest value wins everything it beats
    assert pareto_front([1.0, 2.0, 3.0], [30.0, 20.0, 25.0], higher_is_better=False) == [0, 1]
    # ties at the same cost and quality are both kept
    assert pareto_front([1.0, 1.0, 2.0], [0.5, 0.5, 0.4]) == [0, 1]


def test_pareto_front_agrees_with_brute_force():
    import random

    rng = random.Random(0)
    for _ in range(50):
        costs = [rng.choice([1.0, 2.0, 3.0, 4.0]) for _ in range(12)]
        quality = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(12)]
        dominated = {i for i in range(12) for j in range(12) if costs[j] <= costs[i] and quality[j] >= quality[i]
                     and (costs[j], quality[j]) != (costs[i], quality[i])}
        assert set(pareto_front(costs, quality)) == set(range(12)) - dominated


def test_report_marks_fronts_per_axis():
    def row(name, kind, acc, b1, size):
        return {"id": name, "name": name, "kind": kind, "status": "ok", "metric": {"name": "accuracy", "value": acc},
                "params": {"total": 1}, "flops": 10, "latency_ms": {"b1": b1, "b8": b1 * 4}, "bytes": size,
                "speedup": {"b1": 10.0 / b1, "b8": 10.0 / b1}}

    rows = [row("dense", "dense", 0.9, 10.0, 100), row("fast", "recipe", 0.85, 5.0, 80),
            row("small", "recipe", 0.8, 6.0, 20), row("bad", "recipe", 0.7, 9.0, 90),
            {"id": "x", "name": "broken", "kind": "recipe", "status": "error", "error": "boom"}]
    found = fronts(rows)
    assert set(found["latency_b1"]) == {0, 1} and set(found["bytes"]) == {0, 1, 2}
    text = markdown(rows, "t")
    assert "| bad |" in text and "broken: boom" in text and "2.00x" in text  # dense 10 ms / fast 5 ms


# --- running sweeps --------------------------------------------------------------------------------------


@pytest.fixture
def setup(tmp_path, tokenizer):
    model = save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")
    data = write_sentiment_csv(tmp_path / "data.csv", SENTENCES)
    grid = write(tmp_path / "grid.yaml", """
- stages: [{method: svd, options: {keep: [0.25, 0.5]}}]
- stages: [{method: whitened_svd, options: {keep: 0.5}}]
  calibration: {samples: 16, max_length: 32}
""")
    return model, data, grid


def sweep_args(model, data, grid, out, *extra):
    return ["-q", "sweep", "--model", str(model), "--grid", str(grid), "--task", "text-classification",
            "--data", str(data), "--text-column", "text", "--label-column", "label", "--out", str(out),
            "--repeats", "2", "--max-length", "32", "--seq-len", "32", *extra]


def rows_of(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def test_sweep_measures_every_point_and_resumes_without_redoing_them(setup, tmp_path, capsys):
    model, data, grid = setup
    out = tmp_path / "sweep"
    assert main(sweep_args(model, data, grid, out)) == 0
    rows = rows_of(out)
    assert sorted(r["name"] for r in rows) == sorted(["dense (uncompressed)", "int8 dynamic (PyTorch, one line)",
                                                      "svd[keep=0.25]", "svd[keep=0.5]", "whitened_svd[keep=0.5]"])
    int8 = next(r for r in rows if r["kind"] == "int8")
    assert int8["bytes"] < next(r for r in rows if r["kind"] == "dense")["bytes"]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["params"]["total"] > 0 and row["flops"] > 0 and row["bytes"] > 0
        assert set(row["latency_ms"]) == set(row["speedup"]) == {"b1", "b8"} and 0 <= row["metric"]["value"] <= 1
        assert row["speedup"]["b1"] == pytest.approx(row["dense_latency_ms"]["b1"] / row["latency_ms"]["b1"], 1e-2)
    by_name = {r["name"]: r for r in rows}
    flops = {name: row["flops"] for name, row in by_name.items()}
    assert flops["svd[keep=0.25]"] < flops["svd[keep=0.5]"] < flops["dense (uncompressed)"]
    assert by_name["svd[keep=0.25]"]["bytes"] < by_name["dense (uncompressed)"]["bytes"]
    for name in ("report.md", "pareto_latency_b1.png", "pareto_latency_b8.png", "pareto_bytes.png", "pareto_flops.png"):
        assert (out / name).is_file(), name
    assert "svd[keep=0.25]" in (out / "report.md").read_text()

    # run again: nothing is redone
    assert main(sweep_args(model, data, grid, out)) == 0
    assert len(rows_of(out)) == 5

    # a kill after one point's model was saved but before its result line was written (the line half-written)
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    victim = next(json.loads(line) for line in lines if json.loads(line)["name"] == "svd[keep=0.5]")
    results.write_text("\n".join(line for line in lines if json.loads(line)["id"] != victim["id"]) + '\n{"id": "tru')
    assert main(sweep_args(model, data, grid, out)) == 0
    rows = rows_of_lenient(out)
    assert len(rows) == 5 and rows[-1]["id"] == victim["id"]  # only the missing point ran again
    assert rows[-1]["compress_seconds"] is None  # its saved model was evaluated, not compressed again
    assert rows[-1]["metric"] == victim["metric"] and rows[-1]["bytes"] == victim["bytes"]
    capsys.readouterr()


def rows_of_lenient(out):
    from lmcompress.sweep import read_results

    return read_results(out)


def test_sweep_refuses_an_out_holding_another_sweep(setup, tmp_path, capsys):
    model, data, grid = setup
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"model": "/elsewhere"}))
    (out / "results.jsonl").write_text("")
    assert main(sweep_args(model, data, grid, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a sweep with other settings" in err and "\n" not in err
    assert json.loads((out / "sweep.json").read_text()) == {"model": "/elsewhere"}  # untouched
    assert not (out / "report.md").exists()


@pytest.mark.parametrize("grid_text, extra, message", [
    ("- stages: [{method: nosuch}]", [], "unknown method"),
    ("stages: [{method: svd, options: {keep: 0.5}}]", ["--workers", "0"], "--workers must be at least 1"),
    ("stages: [{method: svd, options: {keep: 0.5}}]", ["--text-column", "nope"], "nope"),
])
def test_bad_sweep_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, grid_text, extra, message):
    model, data, _ = setup
    grid = write(tmp_path / "bad.yaml", grid_text)
    out = tmp_path / "never"
    args = sweep_args(model, data, grid, out)
    if "--text-column" in extra:  # replace the grid's good column by the bad one
        args = args[:args.index("--text-column")] + args[args.index("--label-column"):]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_failing_point_is_recorded_and_the_others_still_run(setup, tmp_path, capsys):
    model, data, _ = setup
    grid = write(tmp_path / "g.yaml", """
- stages: [{method: svd, options: {keep: 0.5}}]
- stages: [{method: svd, targets: ['no_such_layer'], options: {keep: 0.5}}]
""")
    out = tmp_path / "sweep"
    assert main(sweep_args(model, data, grid, out, "--baselines")) == 2
    assert "1 point(s) failed" in capsys.readouterr().err
    rows = {r["name"]: r for r in rows_of(out)}
    assert rows["svd[keep=0.5]"]["status"] == "ok"
    assert rows["svd@no_such_layer[keep=0.5]"]["status"] == "error"
    assert "match no layer" in rows["svd@no_such_layer[keep=0.5]"]["error"]
    assert "Failed points" in (out / "report.md").read_text()


def test_budget_points_share_sensitivity_scores(tmp_path, tokenizer, monkeypatch):
    from lmcompress.engine.allocation import SensitivityProbe
    from lmcompress.engine.pipeline import compress
    from lmcompress.engine.recipe import Recipe
    from lmcompress.engine.reuse import ScoreCache
    from lmcompress.tasks import Examples

    data = Examples(texts=SENTENCES, text_pairs=None, labels=[i % 2 for i in range(len(SENTENCES))],
                    label_names=("negative", "positive"))
    calls = []
    original = SensitivityProbe.score
    monkeypatch.setattr(SensitivityProbe, "score", lambda self, *a: calls.append(1) or original(self, *a))
    cache = ScoreCache(tmp_path / "cache", "model-and-data")
    calibration = {"samples": 16, "max_length": 32}
    sizes = {}
    for fraction in (0.4, 0.6, 0.4):
        calls.clear()
        model = make_tiny_bert(tokenizer.vocab_size)
        recipe = Recipe.from_dict({"stages": [{"method": "whitened_svd", "budget": {"params": fraction}}],
                                   "calibration": calibration})
        summary = compress(model, recipe, tokenizer, data, progress=False, timing=False, reuse=cache)
        sizes.setdefault(fraction, []).append((len(calls), summary.params_after))
    first, again = sizes[0.4]
    assert first[0] > 0 and sizes[0.6][0][0] == 0 and again[0] == 0  # later budgets measured nothing
    assert again[1] == first[1]  # and chose the same sizes from the stored scores
    # another fingerprint (another model or data) shares nothing
    calls.clear()
    recipe = Recipe.from_dict({"stages": [{"method": "whitened_svd", "budget": {"params": 0.4}}],
                               "calibration": calibration})
    compress(make_tiny_bert(tokenizer.vocab_size), recipe, tokenizer, data, progress=False, timing=False,
             reuse=ScoreCache(tmp_path / "cache", "another"))
    assert len(calls) == first[0]


def test_ray_executor_runs_points_on_a_local_cluster(setup, tmp_path, capsys):
    pytest.importorskip("ray")
    model, data, _ = setup
    grid = write(tmp_path / "g.yaml", "stages: [{method: svd, options: {keep: 0.5}}]")
    out = tmp_path / "sweep"
    assert main(sweep_args(model, data, grid, out, "--executor", "ray", "--baselines", "dense")) == 0
    rows = {r["name"]: r for r in rows_of(out)}
    assert set(rows) == {"dense (uncompressed)", "svd[keep=0.5]"}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["svd[keep=0.5]"]["flops"] < rows["dense (uncompressed)"]["flops"]
    capsys.readouterr()


@pytest.mark.parametrize("grid", sorted((REPO / "examples" / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_grids_validate(grid):
    points = load_grid(grid)
    assert points and len({p.point_id for p in points}) == len(points)


def test_sweep_of_a_causal_lm_scores_perplexity_lower_is_better(tmp_path, tokenizer, capsys):
    from conftest import TEXT, tiny_gpt2_lm

    model_dir = tmp_path / "gpt2-lm"
    tiny_gpt2_lm(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write(tmp_path / "text.raw", "\n".join([TEXT] * 4) + "\n")
    grid = write(tmp_path / "g.yaml", """
stages: [{method: whitened_svd, options: {keep: 0.5}}]
calibration: {samples: 4, max_length: 32}
""")
    out = tmp_path / "sweep"
    assert main(["-q", "sweep", "--model", str(model_dir), "--grid", str(grid), "--task", "lm", "--data", str(data),
                 "--out", str(out), "--baselines", "dense", "--repeats", "1", "--max-length", "32",
                 "--seq-len", "16"]) == 0
    rows = {r["kind"]: r for r in rows_of(out)}
    assert rows["dense"]["metric"]["name"] == "perplexity" and rows["dense"]["metric"]["lower_is_better"]
    assert rows["recipe"]["metric"]["value"] > 1 and rows["recipe"]["flops"] < rows["dense"]["flops"]
    assert "| point | perplexity |" in (out / "report.md").read_text()
    capsys.readouterr()
