"""The `learned` method, block-spanning pair capture, and anytime distillation (phases, budget, checkpoints,
kill -9 and resume, mismatch errors, the recipe stage)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SENTENCES, logits, make_tiny_bert, make_tiny_gpt2, save_classifier, write_sentiment_csv

import lmcompress.training.distillation as distill_package
from lmcompress.calibration.collection import collect, encode_calibration
from lmcompress.cli import main
from lmcompress.core.linear import weight_out_in
from lmcompress.core.units import group_units
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import DataError, DistillError, LMCompressError, RecipeError
from lmcompress.io.saving import load, save
from lmcompress.layers import LowRankLinear
from lmcompress.methods.learned.learned import ffn_activation, ffn_forward
from lmcompress.tasks import Examples, get_task
from lmcompress.tasks.metrics import compute_metrics
from lmcompress.training.distillation import DistillConfig, distill, parse_duration, split_heldout
from lmcompress.training.distillation.checkpoint import CheckpointStore
from lmcompress.training.distillation.heldout import HeldOut
from lmcompress.training.distillation.losses import divergence

TEXTS = [f"{s} {t}" for s in SENTENCES for t in ("indeed", "really", "so")]   # 36 distinct examples
TASK = get_task("text-classification", text_column="text", label_column="label")
FAST = {"lr_local": 1e-3, "lr_block": 1e-3, "lr_global": 1e-3, "batch_size": 8, "eval_batch_size": 16,
        "max_length": 32, "checkpoints": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data():
    return Examples(TEXTS, None, [i % 2 for i in range(len(TEXTS))], ("neg", "pos"))


def sharp_teacher(tokenizer, seed: int = 0):
    """A tiny random classifier whose outputs are far from uniform and vary with the input, so divergences are
    measurable (at the default init's scale, 0.02, its outputs hardly depend on the text)."""
    model = make_tiny_bert(tokenizer.vocab_size, seed=seed)
    with torch.no_grad():
        for param in model.bert.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.1)
        model.classifier.weight.mul_(30)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    return model


def compressed_student(teacher, tokenizer, data, recipe: Recipe | None = None):
    student = copy.deepcopy(teacher)
    compress(student, recipe or Recipe.single("whitened_svd", keep=0.25), tokenizer, data, progress=False,
             timing=False)
    return student


# --- parsing ------------------------------------------------------------------------------------------
def test_time_budget_parses_units_and_refuses_nonsense():
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("1h") == 3600
    assert parse_duration("1h30m") == 5400 and parse_duration("2.5m") == 150 and parse_duration(45) == 45
    for bad in ("abc", "0s", "5x", "", "-5m", "m"):
        with pytest.raises(DistillError, match="time budget"):
            parse_duration(bad)


# --- pair capture -------------------------------------------------------------------------------------
def test_pairs_can_span_a_feed_forward_block_at_the_same_tokens(tiny_model, tokenizer, examples):
    model = tiny_model
    unit = group_units(model, "feed_forward")[0]
    layers = {n: model.get_submodule(n) for n in unit.layer_names}
    batches = encode_calibration(tokenizer, examples, 4, 32)
    spans = {unit.layers["out"]: unit.layers["in"]}
    stats = collect(model, batches, layers, {"pairs"}, progress=False, pair_spans=spans)
    assert stats[unit.layers["in"]].pairs is None            # only the span's output layer keeps pairs
    pairs = stats[unit.layers["out"]].pairs
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert pairs.kept == pairs.seen == tokens
    weights = []
    for role in ("in", "out"):
        layer = model.get_submodule(unit.layers[role])
        weights += [weight_out_in(layer).detach(), layer.bias.detach()]
    predicted = ffn_forward(ffn_activation(model), gated=False)(weights, pairs.x)
    torch.testing.assert_close(predicted, pairs.y, rtol=1e-4, atol=1e-5)   # x is the block input, y its output


def test_pair_capture_memory_cap_holds(tiny_bert, tokenizer, examples):
    layers = {n: m for n, m in tiny_bert.named_modules() if n.endswith("intermediate.dense")}
    batches = encode_calibration(tokenizer, examples, 4, 32)
    cap_mb = 0.02
    stats = collect(tiny_bert, batches, layers, {"pairs"}, pairs_mb=cap_mb, progress=False)
    total = sum(s.pairs.x.numel() * 4 + s.pairs.y.numel() * 4 for s in stats.values())
    assert 0 < total <= cap_mb * 2**20
    assert all(s.pairs.seen > s.pairs.kept > 0 for s in stats.values())   # sampled, not truncated to nothing


# --- the learned method -------------------------------------------------------------------------------
def test_learned_ffn_trains_past_its_closed_form_and_round_trips(tokenizer, data, tmp_path):
    model = make_tiny_bert(tokenizer.vocab_size)
    summary = compress(model, Recipe.single("learned", structure="ffn", keep=0.5, max_seconds=2),
                       tokenizer, data, progress=False, timing=False)
    trained = [r for r in summary.layers if "init_err" in r.metrics]
    assert len(trained) == 2
    for record in trained:
        assert record.metrics["output_err"] < record.metrics["init_err"]   # beat selection + least squares
        assert record.metrics["train_s"] <= 2.5 and "epoch" in record.note
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 32
    save(model, tmp_path / "m", tokenizer)
    torch.testing.assert_close(logits(load(tmp_path / "m"), tokenizer), logits(model, tokenizer))


def test_learned_lowrank_is_never_worse_than_whitened_svd_on_held_out_pairs(tokenizer, data):
    model = make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id)
    summary = compress(model, Recipe.single("learned", keep=0.5, max_seconds=0.5), tokenizer, data,
                       progress=False, timing=False)
    assert all(r.metrics["output_err"] <= r.metrics["init_err"] for r in summary.layers)
    assert all(isinstance(model.get_submodule(r.name), LowRankLinear) for r in summary.layers)


def test_learned_is_sized_by_a_stage_budget(tokenizer, data):
    model = make_tiny_bert(tokenizer.vocab_size)
    recipe = Recipe.from_dict({"stages": [{"method": "learned", "options": {"structure": "ffn", "max_seconds": 0.5},
                                           "budget": {"params": 0.5}, "allocation": {"strategy": "uniform"}}]})
    summary = compress(model, recipe, tokenizer, data, progress=False, timing=False)
    assert summary.params_after <= 0.5 * summary.params_before


@pytest.mark.parametrize("stage", [
    {"method": "learned", "options": {"structure": "ffn", "rank": 4}},
    {"method": "learned", "options": {"init": "select"}},
    {"method": "learned", "options": {"keep": 0.5}, "budget": {"params": 0.5}},
    {"method": "distill", "options": {"time": "soon"}},
])
def test_bad_learned_and_distill_options_are_one_line_errors(stage):
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict({"stages": [stage]})
    assert "\n" not in str(err.value)


# --- distillation -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """One short distillation run shared by the checks below."""
    import matplotlib.pyplot  # noqa: F401  the first import (font cache) can take seconds of the 5 s budget

    from lmcompress.io.models import bundled_model_path, load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(str(bundled_model_path()))
    data = Examples(TEXTS, None, [i % 2 for i in range(len(TEXTS))], ("neg", "pos"))
    teacher = sharp_teacher(tokenizer, seed=1)   # tiny random teachers are near-uniform: divergences are ~1e-7
    student = compressed_student(teacher, tokenizer, data)
    ranks = {n: m.rank for n, m in student.named_modules() if isinstance(m, LowRankLinear)}
    train, heldout = split_heldout(data, 0.25)
    out = tmp_path_factory.mktemp("distill") / "run"
    budget = 5.0
    started = time.perf_counter()
    result = distill(teacher, student, tokenizer, train, heldout, TASK, budget, out,
                     config=DistillConfig(**FAST), progress=False)
    return {"result": result, "wall": time.perf_counter() - started, "budget": budget, "ranks": ranks,
            "teacher": teacher, "tokenizer": tokenizer, "out": out}


def test_distillation_lowers_student_teacher_divergence(distilled):
    points = distilled["result"].curve["points"]
    best = distilled["result"].state["best"]
    assert points[0]["phase"] == "start"
    assert best["divergence"] < 0.7 * points[0]["divergence"]
    assert {p["phase"] for p in points} >= {"local", "block", "global"}


def test_the_budget_holds(distilled):
    assert distilled["wall"] <= distilled["budget"] + 1.0
    assert distilled["result"].state["elapsed_s"] >= 0.6 * distilled["budget"]   # and most of it is used


def test_compressed_layers_keep_their_structure_and_the_best_student_loads(distilled):
    out, tokenizer = distilled["out"], distilled["tokenizer"]
    best = load(out / "best")
    assert {n: m.rank for n, m in best.named_modules() if isinstance(m, LowRankLinear)} == distilled["ranks"]
    torch.testing.assert_close(logits(best, tokenizer), logits(distilled["result"].model, tokenizer))
    state = json.loads((out / "state.json").read_text())
    assert state["phase"] == "done" and state["best"]["checkpoint"] in os.readlink(out / "best")
    curve = json.loads((out / "curve.json").read_text())
    assert len(curve["points"]) >= 4 and curve["metric"] == "accuracy"
    assert (out / "curve.png").stat().st_size > 1000
    assert [p.name for p in (out / "checkpoints").iterdir()] == [Path(os.readlink(out / "best")).name]


def test_ctrl_c_leaves_the_best_student_and_a_curve(tokenizer, data, tmp_path, monkeypatch):
    from lmcompress.training.distillation import phases

    teacher = sharp_teacher(tokenizer)
    student = compressed_student(teacher, tokenizer, data)
    train, heldout = split_heldout(data, 0.25)
    calls = {"n": 0}
    original = phases.Phase.step

    def interrupting(self, batch):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(phases.Phase, "step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, student, tokenizer, train, heldout, TASK, 60, tmp_path / "run",
                config=DistillConfig(**{**FAST, "checkpoints": 100}), progress=False)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["phase"] != "done" and state["step"] >= 0
    load(tmp_path / "run" / "best")
    assert (tmp_path / "run" / "curve.png").is_file()


def test_recipe_stage_distills_towards_the_model_before_the_recipe(tokenizer, data):
    teacher = sharp_teacher(tokenizer)
    model = copy.deepcopy(teacher)
    recipe = Recipe.from_dict({"stages": [{"method": "whitened_svd", "options": {"keep": 0.25}},
                                          {"method": "distill", "options": {"time": 6, "heldout": 0.25, **FAST}}]})
    summary = compress(model, recipe, tokenizer, data, progress=False, timing=False)
    report = summary.stages[1].report
    assert report["divergence_after"] < report["divergence_before"]
    assert report["elapsed_s"] <= 6.5
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LowRankLinear)
    stage_two = summary.describe().split("; stage 2 (distill): ")[1]
    assert stage_two.startswith(f"trained {report['steps']} steps") and "held-out divergence" in stage_two


# --- errors -------------------------------------------------------------------------------------------
def test_mismatched_teacher_and_student_are_refused_before_training(tokenizer, data, tmp_path):
    teacher = sharp_teacher(tokenizer)
    train, heldout = split_heldout(data, 0.25)
    cases = [
        (make_tiny_bert(tokenizer.vocab_size, num_labels=3), "label count"),
        (make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id), "architecture"),
        (make_tiny_bert(tokenizer.vocab_size + 7), "tokenizer"),
    ]
    shallow = make_tiny_bert(tokenizer.vocab_size)
    del shallow.bert.encoder.layer[1]
    cases.append((shallow, "depth"))
    for student, words in cases:
        with pytest.raises(DistillError, match=words) as err:
            distill(teacher, student, tokenizer, train, heldout, TASK, 5, tmp_path / "never",
                    config=DistillConfig(**FAST), progress=False)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "never").exists()
    unlabelled = Examples(train.texts, None, [None] * len(train), ("neg", "pos"))
    with pytest.raises(DataError, match="labels"):
        distill(teacher, copy.deepcopy(teacher), tokenizer, unlabelled, heldout, TASK, 5, tmp_path / "never",
                config=DistillConfig(ce_weight=0.5), progress=False)
    with pytest.raises(DataError, match="no training examples"):
        distill(teacher, copy.deepcopy(teacher), tokenizer, Examples([], None, [], None), heldout, TASK, 5,
                tmp_path / "never", progress=False)


def _cli_setup(tokenizer, data, tmp_path: Path) -> dict[str, Path]:
    teacher = sharp_teacher(tokenizer)
    paths = {"teacher": save_classifier(teacher, tokenizer, tmp_path / "teacher"),
             "data": write_sentiment_csv(tmp_path / "data.csv", TEXTS * 2)}
    student = compressed_student(teacher, tokenizer, data)
    save(student, tmp_path / "student", tokenizer)
    paths["student"] = tmp_path / "student"
    return paths


def _cli_args(paths: dict[str, Path], out: Path, budget: str, checkpoints: int = 10) -> list[str]:
    return ["distill", "--teacher", str(paths["teacher"]), "--student", str(paths["student"]),
            "--task", "text-classification", "--data", str(paths["data"]), "--text-column", "text",
            "--label-column", "label", "--time", budget, "--out", str(out), "--heldout", "0.25",
            "--batch-size", "8", "--max-length", "32",
            "--option", "lr_local=1e-3", "lr_block=1e-3", "lr_global=1e-3", f"checkpoints={checkpoints}"]


def test_cli_errors_are_one_line_exit_2(tokenizer, data, tmp_path, capsys):
    paths = _cli_setup(tokenizer, data, tmp_path)
    other = tmp_path / "three"
    three = make_tiny_bert(tokenizer.vocab_size, num_labels=3)
    three.config.id2label = {0: "neg", 1: "mixed", 2: "pos"}
    three.config.label2id = {v: k for k, v in three.config.id2label.items()}
    three.save_pretrained(other)
    tokenizer.save_pretrained(other)
    capsys.readouterr()   # what saving the fixtures printed
    for args, words in ((_cli_args(paths, tmp_path / "o1", "5 minutes"), "time budget"),
                        (_cli_args({**paths, "student": other}, tmp_path / "o2", "5s"), "label count"),
                        (["distill", "--teacher", str(paths["teacher"]), "--time", "5s", "--out",
                          str(tmp_path / "o3"), "--resume"], "nothing|no distillation to resume")):
        assert main(["-q", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and any(w in err for w in words.split("|")), err


def test_kill_9_leaves_a_loadable_best_student_and_resume_continues(tokenizer, data, tmp_path, capsys):
    paths = _cli_setup(tokenizer, data, tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen([sys.executable, "-m", "lmcompress.cli", "-q", *_cli_args(paths, out, "40s")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:   # a checkpoint after some training, not only the starting one
            state = json.loads((out / "state.json").read_text()) if (out / "state.json").is_file() else {}
            if state.get("step", 0) > 0 and state.get("best"):
                break
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.1)
        else:
            pytest.fail("no checkpoint within 60 s")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = json.loads((out / "state.json").read_text())
    best = load(out / "best")                        # loadable whatever the moment of the kill
    assert isinstance(best.bert.encoder.layer[0].attention.self.query, LowRankLinear)
    budget = saved["elapsed_s"] + 3                   # the same budget counts what the killed run spent
    resumed = _cli_args(paths, out, f"{budget:.2f}s") + ["--resume"]
    capsys.readouterr()
    assert main(["-q", *resumed]) == 0, capsys.readouterr().err
    final = json.loads((out / "state.json").read_text())
    assert final["phase"] == "done"
    assert final["step"] > saved["step"] and final["elapsed_s"] > saved["elapsed_s"]
    assert final["elapsed_s"] <= budget + 1.0
    points = json.loads((out / "curve.json").read_text())["points"]
    assert points[0]["phase"] == "start" and points[-1]["step"] == final["step"]   # one curve across both runs
    load(out / "best")


# --- review regressions: workdir and --out never deleted unless a run; kill -9 after a new best; the budget
# across a kill; held-out memory for language models --------------------------------------------------
def stage_recipe(workdir: Path, keep: float = 0.25, time_s: float = 1.5) -> Recipe:
    return Recipe.from_dict({"stages": [
        {"method": "whitened_svd", "options": {"keep": keep}},
        {"method": "distill", "options": {"time": time_s, "heldout": 0.25, "workdir": str(workdir), **FAST}}]})


# --- item 9: the recipe stage and --out never delete what the run did not create ---------------------------
def test_recipe_stage_refuses_a_workdir_that_holds_other_files(tokenizer, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "project").mkdir()
    teacher = sharp_teacher(tokenizer)
    with pytest.raises(RecipeError, match="workdir") as err:
        compress(copy.deepcopy(teacher), stage_recipe(Path(".")), tokenizer, data, progress=False, timing=False)
    assert "\n" not in str(err.value)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "project").is_dir()


def test_recipe_stage_resumes_its_own_run_and_refuses_another_recipes(tokenizer, data, tmp_path):
    teacher = sharp_teacher(tokenizer)
    workdir = tmp_path / "work"
    compress(copy.deepcopy(teacher), stage_recipe(workdir), tokenizer, data, progress=False, timing=False)
    first = json.loads((workdir / "state.json").read_text())
    again = copy.deepcopy(teacher)   # the same recipe once more: continues the run (its budget is spent)
    summary = compress(again, stage_recipe(workdir), tokenizer, data, progress=False, timing=False)
    assert summary.stages[1].report["steps"] >= first["step"]
    torch.testing.assert_close(logits(again, tokenizer), logits(load(workdir / "best"), tokenizer))
    listing = sorted(p.name for p in workdir.rglob("*"))
    with pytest.raises(RecipeError, match="workdir") as err:   # another recipe: another student
        compress(copy.deepcopy(teacher), stage_recipe(workdir, keep=0.5), tokenizer, data, progress=False,
                 timing=False)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in workdir.rglob("*")) == listing


def test_overwrite_replaces_only_a_distillation_run_and_only_its_own_files(tokenizer, data, tmp_path):
    teacher = sharp_teacher(tokenizer)
    train, heldout = split_heldout(data, 0.25)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(LMCompressError, match="no distillation run") as err:
        distill(teacher, compressed_student(teacher, tokenizer, data), tokenizer, train, heldout, TASK, 1, out,
                config=DistillConfig(**FAST), overwrite=True, progress=False)
    assert "\n" not in str(err.value) and (out / "thesis.tex").is_file()
    (out / "thesis.tex").unlink()
    distill(teacher, compressed_student(teacher, tokenizer, data), tokenizer, train, heldout, TASK, 1, out,
            config=DistillConfig(**FAST), progress=False)
    (out / "notes.txt").write_text("about this run")
    distill(teacher, compressed_student(teacher, tokenizer, data), tokenizer, train, heldout, TASK, 1, out,
            config=DistillConfig(**FAST), overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "about this run"
    load(out / "best")


def test_cli_overwrite_never_deletes_a_directory_it_did_not_write(tokenizer, data, tmp_path, capsys):
    paths = _cli_setup(tokenizer, data, tmp_path)
    out = tmp_path / "home"
    out.mkdir()
    (out / "photos.txt").write_text("precious")
    capsys.readouterr()
    assert main(["-q", *_cli_args(paths, out, "2s"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no distillation run" in err, err
    assert (out / "photos.txt").read_text() == "precious"


# --- item 10: kill -9 right after a new best is saved ----------------------------------------------------
class Killed(BaseException):
    """Stands for kill -9: nothing after the raise runs, no handler writes anything."""


def test_kill_right_after_a_new_best_keeps_that_best_on_resume(tokenizer, data, tmp_path, monkeypatch):
    teacher = sharp_teacher(tokenizer)
    train, heldout = split_heldout(data, 0.25)
    out = tmp_path / "run"
    original = CheckpointStore.save_best

    def save_then_die(self, model, tok, state):
        name = original(self, model, tok, state)
        if state["step"] > 0:
            raise Killed
        return name

    monkeypatch.setattr(CheckpointStore, "save_best", save_then_die)
    with pytest.raises(Killed):
        distill(teacher, compressed_student(teacher, tokenizer, data), tokenizer, train, heldout, TASK, 30, out,
                config=DistillConfig(**{**FAST, "checkpoints": 60}), progress=False)
    monkeypatch.undo()
    state = json.loads((out / "state.json").read_text())
    assert (out / "checkpoints" / state["best"]["checkpoint"]).is_dir(), "state.json names a deleted checkpoint"
    linked = json.loads((out / "best" / "lmcompress.json").read_text())["distill"]
    assert linked["step"] > 0 and linked["best"]["divergence"] < state["best"]["divergence"]
    # resume with no time left: nothing trains, so what the run reports is what it read back
    result = distill(teacher, None, tokenizer, train, heldout, TASK, linked["elapsed_s"], out, resume=True,
                     config=DistillConfig(**{**FAST, "checkpoints": 60}), progress=False)
    assert result.state["best"]["step"] == linked["best"]["step"]
    assert result.state["best"]["divergence"] == linked["best"]["divergence"]
    assert result.state["step"] >= linked["step"] and result.state["elapsed_s"] >= linked["elapsed_s"]
    assert Path(os.readlink(out / "best")).name == result.state["best"]["checkpoint"]


# --- item 12: the budget holds across kill -9 ------------------------------------------------------------
def test_time_after_the_last_checkpoint_counts_against_the_budget_on_resume(tokenizer, data, tmp_path, capsys,
                                                                            monkeypatch):
    paths = _cli_setup(tokenizer, data, tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    process = subprocess.Popen([sys.executable, "-m", "lmcompress.cli", "-q", *_cli_args(paths, out, "300s", 2)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:   # the starting checkpoint; the next one is 60 s later
            if (out / "state.json").is_file():
                seen_at, saved = time.monotonic(), json.loads((out / "state.json").read_text())
                break
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 60 s")
        time.sleep(5)   # training, with no checkpoint
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_at = time.monotonic()
    assert json.loads((out / "state.json").read_text())["elapsed_s"] == saved["elapsed_s"]
    spent = saved["elapsed_s"] + (killed_at - seen_at)   # at least what the killed run spent distilling
    budget = saved["elapsed_s"] + 8
    timed = {}
    original = distill_package.distill

    def timed_distill(*args, **kwargs):
        begun = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timed["wall"] = time.perf_counter() - begun

    monkeypatch.setattr(distill_package, "distill", timed_distill)
    capsys.readouterr()
    assert main(["-q", *_cli_args(paths, out, f"{budget:.2f}s", 2), "--resume"]) == 0, capsys.readouterr().err
    assert spent + timed["wall"] <= budget + 2.0, (spent, timed["wall"], budget)
    assert json.loads((out / "state.json").read_text())["elapsed_s"] <= budget + 1.0


# --- item 15: held-out memory for language models ---------------------------------------------------------
def _tiny_lm(vocab_size: int, pad_token_id: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        pad_token_id=pad_token_id, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _stored_tensors(value, depth: int = 0):
    """Every tensor an object keeps in its attributes (lists, tuples, dicts), models excluded."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, torch.nn.Module) or depth > 4:
        return
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _stored_tensors(item, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _stored_tensors(item, depth + 1)
    elif hasattr(value, "__dict__") and depth == 0:
        for item in vars(value).values():
            yield from _stored_tensors(item, depth + 1)


def _reference_divergence(teacher, student, heldout: HeldOut, regression: bool) -> tuple[float, list]:
    """The score as computed before the change: every logit of both models kept, then compared."""
    with torch.inference_mode():
        t_all = [teacher(**batch).logits.float() for batch in heldout.batches]
        s_all = [student(**batch).logits.float() for batch in heldout.batches]
    total, count = 0.0, 0
    for s, t, batch in zip(s_all, t_all, heldout.batches, strict=True):
        values = divergence(s, t, regression, batch.get("attention_mask"))
        total += float(values.sum())
        count += values.numel()
    return total / count, s_all


def test_language_model_heldout_keeps_no_per_token_vocabulary_logits(tokenizer):
    vocab = tokenizer.vocab_size
    teacher = _tiny_lm(vocab, tokenizer.pad_token_id, seed=0)
    student = _tiny_lm(vocab, tokenizer.pad_token_id, seed=1)
    texts = TEXTS * 3
    examples = Examples(texts, None, [None] * len(texts), None)
    heldout = HeldOut(teacher, tokenizer, examples, get_task("language-modeling"),
                      DistillConfig(eval_batch_size=8, max_length=32, heldout_logits_mb=0))
    assert len(heldout.batches) > 1
    per_token = [t.shape for t in _stored_tensors(heldout) if t.dim() >= 3 or (t.dim() >= 1 and t.shape[-1] == vocab)]
    assert per_token == [], per_token
    score = heldout.score(student)
    expected, _ = _reference_divergence(teacher, student, heldout, False)
    assert score.divergence > 0 and score.metric is None
    assert score.divergence == pytest.approx(expected, rel=1e-5)
    assert heldout.score(teacher).divergence == pytest.approx(0.0, abs=1e-6)


def test_language_model_heldout_logits_stay_under_their_cap_on_the_host(tokenizer):
    teacher = _tiny_lm(tokenizer.vocab_size, tokenizer.pad_token_id, seed=0)
    student = _tiny_lm(tokenizer.vocab_size, tokenizer.pad_token_id, seed=1)
    texts = TEXTS * 3
    examples = Examples(texts, None, [None] * len(texts), None)
    task = get_task("language-modeling")
    everything = HeldOut(teacher, tokenizer, examples, task, DistillConfig(eval_batch_size=4, max_length=32,
                                                                          heldout_logits_mb=1024))
    sizes = [t.numel() * 4 for t in everything.teacher_logits]
    assert all(t is not None and t.device.type == "cpu" for t in everything.teacher_logits)
    cap_mb = (sizes[0] + sizes[1] + sizes[2] // 2) / 2**20     # room for two batches and a half
    capped = HeldOut(teacher, tokenizer, examples, task, DistillConfig(eval_batch_size=4, max_length=32,
                                                                      heldout_logits_mb=cap_mb))
    kept = [t for t in capped.teacher_logits if t is not None]
    assert len(kept) == 2 and capped.kept_bytes == sum(t.numel() * t.element_size() for t in kept)
    assert capped.kept_bytes <= cap_mb * 2**20 and all(t.device.type == "cpu" for t in kept)
    expected, _ = _reference_divergence(teacher, student, capped, False)
    for heldout in (everything, capped):   # kept or recomputed, the same score
        assert heldout.score(student).divergence == pytest.approx(expected, rel=1e-5)


def test_classifier_heldout_scores_are_unchanged(tokenizer, data):
    teacher = sharp_teacher(tokenizer, seed=1)
    student = compressed_student(teacher, tokenizer, data)
    heldout = HeldOut(teacher, tokenizer, data, TASK, DistillConfig(eval_batch_size=8, max_length=32))
    score = heldout.score(student)
    expected, s_all = _reference_divergence(teacher, student, heldout, False)
    assert score.divergence == pytest.approx(expected, rel=1e-5)
    predictions = torch.cat(s_all).argmax(-1).numpy()
    assert score.metric == pytest.approx(compute_metrics(TASK, predictions, heldout.labels)[TASK.metric])
