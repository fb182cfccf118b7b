"""`lmcompress auto` end to end on a tiny random model and a small CSV: an answer within the guard (or the
dense model when nothing met it), the best valid model always on disk (also when interrupted), the report, and
one-line refusals. Latency tables are priced by a formula (tests check the logic; benchmarks time)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SENTENCES, save_classifier, write_sentiment_csv
from transformers import BertConfig, BertForSequenceClassification

import lmcompress
from lmcompress.auto.proxy import Guard, Score
from lmcompress.auto.search import Search
from lmcompress.cli import main
from lmcompress.engine.recipe import Recipe
from lmcompress.evaluation import efficiency
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
    monkeypatch.setenv(lt.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(LatencyTable, "measure", lambda self, kind, fields, module=None: formula(kind, fields, module))

    def fake_passes(model, batch_size, seq_len, repeats, warmup=2):
        table = LatencyTable.for_model(model, batch_size, seq_len, path=None)   # in the model's dtype
        act = lt.activation_name(model)
        blocks = [lt.block_components_ms(table, p, act) for p in lt.block_parts(model)]
        return sum(blocks) + sum(table.module(m) for m in lt.outside_linears(model).values()) + 0.5, blocks

    monkeypatch.setattr(lt, "timed_passes", fake_passes)

    def fake_clock(models, batch_size=1, seq_len=128, warmup=2, repeats=20):
        """The side-by-side timing priced by the same formula: a tiny model's real clock is noise."""
        return {name: {"median_ms": fake_passes(model, batch_size, seq_len, repeats)[0], "p25_ms": 0.0,
                       "p75_ms": 0.0, "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats,
                       "threads": 1, "device": "cpu"} for name, model in models.items()}

    monkeypatch.setattr(efficiency, "paired_latency", fake_clock)


@pytest.fixture
def tiny(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    model_dir = save_classifier(BertForSequenceClassification(config).eval(), tokenizer, tmp_path / "tiny")
    texts = [f"{s} {w}" for w in ("indeed", "truly", "today", "again", "really", "honestly", "somehow", "still")
             for s in SENTENCES]
    return model_dir, write_sentiment_csv(tmp_path / "data.csv", texts)


def run(tiny, out, *extra: str) -> int:
    model_dir, data = tiny
    return main(["-q", "auto", "--model", str(model_dir), "--task", "text-classification", "--data", str(data),
                 "--text-column", "text", "--label-column", "label", "--seq-len", "32", "--calib-samples", "16",
                 "--repeats", "2", "--out", str(out), *extra])


def test_the_answer_is_within_the_guard_never_slower_than_int8_and_loads(fake_table, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tiny, out, "--time", "30s", "--max-drop", "5") == 0, capsys.readouterr().err
    front = json.loads((out / "front.json").read_text())
    chosen = front["final"]["chosen"]
    assert chosen["valid"] and chosen["drop"] + front["z"] * chosen["se"] <= 5
    assert chosen["chain"] != "dense"   # prune and int8 are cheaper under the formula, and drop nothing here
    timing = front["final"]["timing"]
    int8 = next(c for c in front["candidates"] if c["chain"] == "int8")
    if int8["valid"]:
        key = f"{chosen['chain']}|{chosen['distill_s']}"
        assert timing[key]["median_ms"] <= timing["int8|0"]["median_ms"]
    assert lmcompress.load(out / "model") is not None   # saved like any other model
    assert json.loads((out / "best.json").read_text())["chain"] == chosen["chain"]
    Recipe.from_yaml(out / "recipe.yaml")    # the chosen chain as a recipe
    report = (out / "report.md").read_text()
    assert "## Explored front" in report and "Scored once on dev" in report and "Side by side" in report
    assert len(front["candidates"]) > 2      # the search went beyond the baselines
    assert "chosen:" in capsys.readouterr().out
    # the formula prices bfloat16 like float32 (a CPU without AMX or AVX512-BF16): no bf16 chain was scored
    assert "bf16" in front["left_out"] and not any("bf16" in c["chain"] for c in front["candidates"])
    assert "bf16 was left out of the search" in report


def test_bfloat16_chains_are_searched_where_the_table_prices_them_faster(fake_table, tiny, tmp_path, monkeypatch,
                                                                        capsys):
    """On a machine whose bfloat16 products take a third of float32's time (AMX), bf16 and structure + bf16 chains
    are scored, and a bf16 answer is saved and loads in bfloat16."""
    monkeypatch.setattr(LatencyTable, "measure", lambda self, kind, fields, module=None: formula(kind, fields, module)
                        * (0.3 if self.dtype == torch.bfloat16 else 1.0))
    out = tmp_path / "out"
    assert run(tiny, out, "--time", "30s", "--max-drop", "5") == 0, capsys.readouterr().err
    front = json.loads((out / "front.json").read_text())
    scored = {c["chain"] for c in front["candidates"]}
    assert not front["left_out"] and "bf16" in scored and any(c.endswith(" + bf16") for c in scored)
    chosen = front["final"]["chosen"]["chain"]
    model = lmcompress.load(out / "model")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    assert dtypes == ({torch.bfloat16} if chosen.endswith("bf16") else dtypes - {torch.bfloat16})
    if chosen.endswith("bf16"):
        assert Recipe.from_yaml(out / "recipe.yaml").stages[-1].method == "cast"


def test_latency_costs_are_the_clock_not_the_table_each_chain_timed_once(fake_table, tiny, tmp_path, monkeypatch):
    """A table that predicts pruned models too fast (as it did at batch 8, by 10-37%) does not decide the search: each
    built chain is timed once beside dense, and its cost is its measured share of dense's time; the prediction is
    kept beside it."""
    clock = efficiency.paired_latency
    calls = []

    def slow_pruned_clock(models, batch_size=1, seq_len=128, warmup=2, repeats=20):
        timing = clock(models, batch_size, seq_len, warmup, repeats)
        for name, model in models.items():
            pruned = model.bert.encoder.layer[0].output.dense.in_features < 64   # neurons went
            timing[name]["median_ms"] *= 2.0 if pruned else 1.0
        if len(models) == 2:
            calls.append(sorted(models))
        return timing

    monkeypatch.setattr(efficiency, "paired_latency", slow_pruned_clock)
    out = tmp_path / "out"
    assert run(tiny, out, "--time", "20s", "--max-drop", "50", "--min-gain", "0") == 0
    front = json.loads((out / "front.json").read_text())
    rows = front["candidates"]
    dense = next(r for r in rows if r["chain"] == "dense")
    assert dense["cost"] == pytest.approx(front["dense_measured_ms"], rel=1e-3)
    assert dense["predicted"] == pytest.approx(front["dense_predicted_ms"], rel=1e-3)
    pruned = [r for r in rows if r["chain"].startswith("prune")]
    assert pruned and all(r["cost"] > 1.5 * r["predicted"] * dense["cost"] / dense["predicted"] for r in pruned)
    chains = {r["chain"] for r in rows if r["chain"] != "dense"} | set(front["left_out"])   # bf16: timed, left out
    assert len(calls) == len(chains)        # one timing per chain, however often it was scored
    assert "measured at" in front["left_out"]["bf16"]
    assert "predicted" in (out / "report.md").read_text()


def test_when_nothing_meets_the_guard_the_answer_is_dense_and_the_report_says_so(fake_table, tiny, tmp_path,
                                                                                 monkeypatch):
    real = Guard.score
    monkeypatch.setattr(Guard, "score", lambda self, model: Score(real(self, model).metric - 3, 3.0, 0.0))
    out = tmp_path / "out"
    assert run(tiny, out, "--time", "6s", "--max-drop", "1") == 0
    front = json.loads((out / "front.json").read_text())
    assert front["final"]["chosen"]["chain"] == "dense"
    assert not any(c["valid"] for c in front["candidates"] if c["chain"] != "dense")
    assert "No compressed candidate kept the drop within the limit" in (out / "report.md").read_text()
    assert (out / "recipe.yaml").read_text().startswith("# no compression met")
    assert lmcompress.load(out / "model") is not None


@pytest.mark.parametrize("confirm_size", ["1000", "0"])
def test_finalists_that_fail_the_confirmation_split_are_not_the_answer(fake_table, tiny, tmp_path, monkeypatch,
                                                                       confirm_size):
    # every compressed model keeps the guard but loses 3 points on the confirmation split (a lucky guard)
    real = Guard.score
    monkeypatch.setattr(Guard, "score", lambda self, model: (Score(real(self, model).metric - 3, 3.0, 0.0)
                                                               if self.name == "confirmation"
                                                               else Score(real(self, model).metric, 0.0, 0.0)))
    out = tmp_path / "out"
    assert run(tiny, out, "--time", "30s", "--max-drop", "1", "--confirm-size", confirm_size) == 0
    final = json.loads((out / "front.json").read_text())["final"]
    if confirm_size == "0":   # no confirmation: the guard alone decides
        assert final["chosen"]["chain"] != "dense" and final["confirmation"] == {}
        return
    assert final["chosen"]["chain"] == "dense"
    failed = [k for k, v in final["confirmation"].items() if k != "dense|0"]
    assert failed and all(final["confirmation"][k]["drop"] == 3.0 for k in failed)
    assert lmcompress.load(out / "model") is not None   # the dense model replaced the guard's best on disk
    report = (out / "report.md").read_text()
    assert "lost more than the limit on the confirmation split" in report


def test_the_guard_and_confirmation_come_from_the_holdout(fake_table, tiny, tmp_path, monkeypatch):
    """With --holdout, every example the search and the confirmation score is one the model never trained on."""
    holdout_texts = [f"{s} {w}" for w in ("unseen", "elsewhere", "later", "anew") for s in SENTENCES]
    holdout = write_sentiment_csv(tmp_path / "holdout.csv", holdout_texts)
    scored: dict[str, set] = {}
    real_init = Guard.__init__

    def spy(self, task, examples, *args, **kwargs):
        real_init(self, task, examples, *args, **kwargs)
        scored.setdefault(self.name, set()).update(examples.texts)

    monkeypatch.setattr(Guard, "__init__", spy)
    out = tmp_path / "out"
    assert run(tiny, out, "--time", "30s", "--max-drop", "5", "--holdout", str(holdout),
               "--guard-size", "30", "--confirm-size", "20") == 0
    assert set(scored) == {"guard", "confirmation", "dev"}
    assert scored["guard"] <= set(holdout_texts) and scored["confirmation"] <= set(holdout_texts)
    assert not scored["guard"] & scored["confirmation"]
    # 4 x len(SENTENCES) examples, fewer than 30 + 20: shared in proportion 3:2
    total = len(holdout_texts)
    assert len(scored["confirmation"]) == round(total * 20 / 50) and len(scored["guard"]) == total - round(total * 0.4)
    assert "--holdout" in (out / "report.md").read_text()


def test_training_examples_in_the_holdout_are_left_out_of_calibration_and_distillation(tiny, tmp_path):
    from lmcompress.auto.entry import AutoArgs, _holdout_splits
    from lmcompress.entrypoints.arguments import DataArgs, OutputArgs
    from lmcompress.errors import DataError
    from lmcompress.io.models import load_model
    from lmcompress.tasks import get_task, load_examples

    model_dir, data = tiny
    model = load_model(str(model_dir))[0]
    task = get_task("text-classification", text_column="text", label_column="label")
    train = load_examples(task, data, "train")
    unseen = [f"{s} unseen" for s in SENTENCES] * 5
    holdout = write_sentiment_csv(tmp_path / "holdout.csv", train.texts[:30] + unseen)

    def args(path, guard, confirm):
        return AutoArgs(OutputArgs(str(tmp_path / "out")), str(model_dir),
                        DataArgs(task="text-classification", data=str(data), text_column="text",
                                 label_column="label"), guard_size=guard, confirm_size=confirm, holdout=str(path))

    rest, guard, confirmation = _holdout_splits(args(holdout, 40, 10), model, train)
    assert (len(guard), len(confirmation)) == (40, 10)   # enough examples: the sizes asked for
    assert len(rest) == len(train) - 30 and not set(rest.texts) & set(train.texts[:30])
    # uneven sizes on a small holdout: the smaller split still gets its 10
    rest, guard, confirmation = _holdout_splits(args(holdout, 1000, 50), model, train)
    total = 30 + len(unseen)
    assert (len(guard), len(confirmation)) == (total - 10, 10)
    with pytest.raises(DataError, match="training examples outside --holdout"):
        _holdout_splits(args(data, 40, 10), model, train)   # every training example is in it


@pytest.mark.parametrize("exits_speed", [0.5, 1.0])
def test_early_exit_is_kept_only_when_it_is_faster_on_real_text(fake_table, tiny, tmp_path, monkeypatch,
                                                                exits_speed):
    from lmcompress.evaluation import dynamic
    from lmcompress.layers.early_exit import exits_of

    real = Guard.score
    monkeypatch.setattr(Guard, "score", lambda self, model: Score(real(self, model).metric, 0.0, 0.0))
    timed = []

    def fake_data_clock(models, tokenizer, examples, batch_size, max_length=128, repeats=3):
        timed.append((sorted(models), len(examples), batch_size))
        return {"dense": {"median_ms": 10.0}, "base": {"median_ms": 5.0}, "exits": {"median_ms": 5.0 * exits_speed}}

    monkeypatch.setattr(dynamic, "paired_data_latency", fake_data_clock)
    out = tmp_path / "out"
    assert run(tiny, out, "--time", "35s", "--max-drop", "5", "--early-exit") == 0
    final = json.loads((out / "front.json").read_text())["final"]
    exits, chosen = final["exits"], final["chosen"]["chain"]
    assert timed == [(["base", "dense", "exits"], timed[0][1], 8)] and 0 < timed[0][1] <= 256
    assert exits["base"].split("|")[0] != "dense" and exits["options"]["target_drop"] > 0
    report = (out / "report.md").read_text()
    loaded = lmcompress.load(out / "model")
    if exits_speed < 1:
        assert exits["kept"] and chosen == exits["base"].split("|")[0] + " + exits"
        assert final["static"]["chain"] == exits["base"].split("|")[0]
        assert exits_of(loaded) is not None       # the answer on disk carries its exits and rule
        best = json.loads((out / "best.json").read_text())
        assert best["chain"] == chosen and best["exits"]["kept"]
        stages = Recipe.from_yaml(out / "recipe.yaml").stages
        assert stages[-1].method == "early_exit" and stages[-1].options["target_drop"] == exits["options"][
            "target_drop"]
        assert "**kept**" in report and f"dev ({final['dev_examples']} examples): {chosen}" in report
    else:
        assert not exits["kept"] and "not faster on real text" in exits["reason"] and "exits" not in chosen
        assert exits_of(loaded) is None and "not kept" in report


def test_early_exit_needs_the_latency_target(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tiny, out, "--time", "5m", "--target", "bytes", "--early-exit") == 2
    assert "--early-exit needs --target latency" in capsys.readouterr().err and not out.exists()
    assert run(tiny, out, "--time", "20s", "--early-exit") == 2
    assert "too short for --early-exit" in capsys.readouterr().err and not out.exists()


def test_an_interrupted_search_leaves_the_best_model_so_far(fake_table, tiny, tmp_path, monkeypatch):
    def interrupted(self, structure):
        raise KeyboardInterrupt

    monkeypatch.setattr(Search, "build", interrupted)
    out = tmp_path / "out"
    assert run(tiny, out, "--time", "30s", "--max-drop", "5") == 130
    best = json.loads((out / "best.json").read_text())
    assert best["chain"] in ("int8", "dense") and best["valid"]
    assert lmcompress.load(out / "model") is not None
    assert "Interrupted before the final timing" in (out / "report.md").read_text()
    assert not list(out.glob(".*tmp*")) and len(list((out / "models").iterdir())) == 1


@pytest.mark.parametrize("extra, message", [
    (["--max-drop", "-1"], "impossible --max-drop"),
    (["--max-drop", "100"], "impossible --max-drop"),
    (["--max-drop", "nan"], "impossible --max-drop"),
    (["--target", "speed"], "unknown --target 'speed'"),
    (["--time", "soon"], "--time"),
    (["--data", "/nonexistent/data.csv"], "data.csv"),
    (["--time", "0.01s"], "too short"),
    (["--confirm-size", "5"], "--confirm-size must be 0"),
    (["--min-gain", "1"], "impossible --min-gain 1.0"),
    (["--min-gain", "-0.1"], "impossible --min-gain -0.1"),
    (["--holdout", "/nonexistent/holdout.csv"], "--holdout /nonexistent/holdout.csv does not exist"),
    (["--holdout", "SMALL"], "--holdout has 6 examples; it needs at least 20"),
])
def test_bad_arguments_fail_in_one_line_and_write_nothing(fake_table, tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = extra if "--time" in extra else ["--time", "20s", *extra]
    if "SMALL" in args:
        args[args.index("SMALL")] = str(write_sentiment_csv(tmp_path / "small.csv", SENTENCES[:6]))
    assert run(tiny, out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_a_non_empty_out_is_refused_unless_it_holds_an_auto_run(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert run(tiny, out, "--overwrite") == 2
    assert "holds no auto run" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"


def test_the_drop_standard_error_is_paired(tokenizer):
    """Two models that disagree on no example have a drop of 0 with no spread; disagreement gives spread."""
    from lmcompress.tasks import Examples, get_task

    task = get_task("sst2")
    examples = Examples(SENTENCES * 4, None, [i % 2 for i in range(48)], ("negative", "positive"))
    guard = Guard(task, examples, tokenizer, 32)
    guard.dense_predictions = guard.labels.copy()
    assert guard.drop_se(guard.labels.copy()) == 0
    flipped = guard.labels.copy()
    flipped[:12] = 1 - flipped[:12]
    se = guard.drop_se(flipped)
    assert 0 < se < 25 and math.isfinite(se)
