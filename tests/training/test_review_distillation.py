"""Review regressions for distillation: a recipe's `workdir` and CLI `--out` are never deleted unless they hold
a distillation run; kill -9 right after a new best; the budget across a kill; held-out memory for language
models."""

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
from conftest import SENTENCES, logits, make_tiny_bert, save_classifier, write_sentiment_csv

import lmcompress.training.distillation as distill_package
from lmcompress.cli import main
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import LMCompressError, RecipeError
from lmcompress.io.saving import load, save
from lmcompress.tasks import Examples, get_task
from lmcompress.tasks.metrics import compute_metrics
from lmcompress.training.distillation import DistillConfig, distill, split_heldout
from lmcompress.training.distillation.checkpoint import CheckpointStore
from lmcompress.training.distillation.heldout import HeldOut
from lmcompress.training.distillation.losses import divergence

TEXTS = [f"{s} {t}" for s in SENTENCES for t in ("indeed", "really", "so")]
TASK = get_task("text-classification", text_column="text", label_column="label")
FAST = {"lr_local": 1e-3, "lr_block": 1e-3, "lr_global": 1e-3, "batch_size": 8, "eval_batch_size": 16,
        "max_length": 32, "checkpoints": 8}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data():
    return Examples(TEXTS, None, [i % 2 for i in range(len(TEXTS))], ("neg", "pos"))


def sharp_teacher(tokenizer, seed: int = 0):
    model = make_tiny_bert(tokenizer.vocab_size, seed=seed)
    with torch.no_grad():
        model.classifier.weight.mul_(30)
        model.bert.pooler.dense.weight.mul_(10)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    return model


def compressed_student(teacher, tokenizer, data):
    student = copy.deepcopy(teacher)
    compress(student, Recipe.single("whitened_svd", keep=0.25), tokenizer, data, progress=False, timing=False)
    return student


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


def _cli_setup(tokenizer, data, tmp_path: Path) -> dict[str, Path]:
    teacher = sharp_teacher(tokenizer)
    paths = {"teacher": save_classifier(teacher, tokenizer, tmp_path / "teacher"),
             "data": write_sentiment_csv(tmp_path / "data.csv", TEXTS * 2)}
    save(compressed_student(teacher, tokenizer, data), tmp_path / "student", tokenizer)
    paths["student"] = tmp_path / "student"
    return paths


def _cli_args(paths: dict[str, Path], out: Path, budget: str, checkpoints: int = 10) -> list[str]:
    return ["distill", "--teacher", str(paths["teacher"]), "--student", str(paths["student"]),
            "--task", "text-classification", "--data", str(paths["data"]), "--text-column", "text",
            "--label-column", "label", "--time", budget, "--out", str(out), "--heldout", "0.25",
            "--batch-size", "8", "--max-length", "32",
            "--option", "lr_local=1e-3", "lr_block=1e-3", "lr_global=1e-3", f"checkpoints={checkpoints}"]


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
                      DistillConfig(eval_batch_size=8, max_length=32))
    assert len(heldout.batches) > 1
    per_token = [t.shape for t in _stored_tensors(heldout) if t.dim() >= 3 or (t.dim() >= 1 and t.shape[-1] == vocab)]
    assert per_token == [], per_token
    score = heldout.score(student)
    expected, _ = _reference_divergence(teacher, student, heldout, False)
    assert score.divergence > 0 and score.metric is None
    assert score.divergence == pytest.approx(expected, rel=1e-5)
    assert heldout.score(teacher).divergence == pytest.approx(0.0, abs=1e-6)


def test_classifier_heldout_scores_are_unchanged(tokenizer, data):
    teacher = sharp_teacher(tokenizer, seed=1)
    student = compressed_student(teacher, tokenizer, data)
    heldout = HeldOut(teacher, tokenizer, data, TASK, DistillConfig(eval_batch_size=8, max_length=32))
    score = heldout.score(student)
    expected, s_all = _reference_divergence(teacher, student, heldout, False)
    assert score.divergence == pytest.approx(expected, rel=1e-5)
    predictions = torch.cat(s_all).argmax(-1).numpy()
    assert score.metric == pytest.approx(compute_metrics(TASK, predictions, heldout.labels)[TASK.metric])
