"""The command line: smoke tests of each subcommand and one clear line + exit 2 for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SENTENCES, make_tiny_bert, save_classifier, write_sentiment_csv

from lmcompress.cli import main


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    return save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")


@pytest.fixture
def csv_file(tmp_path):
    return write_sentiment_csv(tmp_path / "data.csv", SENTENCES)


def data_args(csv_file):
    return ["--task", "text-classification", "--data", str(csv_file), "--text-column", "text",
            "--label-column", "label"]


def run(argv, capsys):
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compress_then_evaluate(model_dir, csv_file, tmp_path, capsys):
    out = tmp_path / "small"
    code, stdout, _ = run(["compress", "--model", str(model_dir), "--method", "whitened_svd", "--keep", "0.5",
                           *data_args(csv_file), "--calib-samples", "8", "--out", str(out),
                           "--dense-out", str(tmp_path / "dense")], capsys)
    assert code == 0, stdout
    assert "compressed 12 of 12 targeted layers" in stdout
    assert (out / "recipe.yaml").is_file() and (out / "lmcompress.json").is_file()
    assert (tmp_path / "dense" / "model.safetensors").is_file()
    result_file = tmp_path / "eval.json"
    code, stdout, _ = run(["evaluate", "--model", str(out), *data_args(csv_file), "--repeats", "2",
                           "--seq-len", "16", "--json", str(result_file)], capsys)
    assert code == 0
    result = json.loads(result_file.read_text())
    assert result["metric"]["name"] == "accuracy" and 0 <= result["metric"]["value"] <= 1
    assert result["params"]["total"] == sum(v for k, v in result["params"].items() if k != "total")
    assert result["flops"] > 0 and result["latency_ms"] > 0 and result["size_bytes"] > 0
    assert "accuracy" in stdout


def test_compress_with_recipe_file(model_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - method: svd\n    targets: ['intermediate']\n    options: {rank: 4}\n")
    code, stdout, _ = run(["compress", "--model", str(model_dir), "--recipe", str(recipe),
                           "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and "compressed 2 of 2" in stdout


def test_finetune_small(model_dir, csv_file, tmp_path, capsys):
    out = tmp_path / "ft"
    code, stdout, _ = run(["finetune", "--model", str(model_dir), *data_args(csv_file), "--out", str(out),
                           "--epochs", "1", "--batch-size", "4", "--max-length", "16"], capsys)
    assert code == 0 and "saved to" in stdout
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_methods_lists_options(capsys):
    code, stdout, _ = run(["methods"], capsys)
    assert code == 0 and "whitened_svd" in stdout and "damp" in stdout


@pytest.mark.parametrize("extra, message", [
    (["--method", "magic", "--keep", "0.5"], "unknown method 'magic'"),
    (["--method", "svd", "--keep", "0"], "keep: Input should be greater than 0"),
    (["--method", "svd", "--keep", "1.5"], "keep: Input should be less than or equal to 1"),
    (["--method", "svd", "--keep", "0.5", "--targets", "nothing_matches"], "match no layer it can compress"),
    (["--method", "whitened_svd", "--keep", "0.5", "--task", "nonsense"], "unknown task 'nonsense'"),
    (["--method", "whitened_svd", "--keep", "0.5", "--task", "text-classification", "--text-column", "sentence",
      "--label-column", "label"], "missing column 'sentence'"),
    (["--method", "whitened_svd", "--keep", "0.5", "--calib-samples", "0"], "greater than or equal to 1"),
])
def test_bad_compress_input(model_dir, csv_file, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    if "--task" in extra and "--data" not in extra:
        extra = [*extra, "--data", str(csv_file)]
    code, _, stderr = run(["compress", "--model", str(model_dir), *extra, "--out", str(out)], capsys)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_empty_calibration_set(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    code, _, stderr = run(["compress", "--model", str(model_dir), "--method", "whitened_svd",
                           "--task", "text-classification", "--data", str(empty), "--text-column", "text",
                           "--label-column", "label", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "no examples" in stderr and not (tmp_path / "out").exists()


def test_missing_and_corrupt_model(tmp_path, capsys):
    code, _, stderr = run(["evaluate", "--model", str(tmp_path / "absent")], capsys)
    assert code == 2 and "not found" in stderr
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{ this is not json")
    code, _, stderr = run(["compress", "--model", str(corrupt), "--method", "svd", "--out", str(tmp_path / "o")],
                          capsys)
    assert code == 2 and "could not load" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    broken_weights = tmp_path / "broken-weights"
    from transformers import BertConfig
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        broken_weights)
    (broken_weights / "model.safetensors").write_bytes(b"garbage" * 10)
    code, _, stderr = run(["evaluate", "--model", str(broken_weights)], capsys)
    assert code == 2 and "could not load model" in stderr and len(stderr.strip().splitlines()) == 1
    pickle_only = tmp_path / "pickle-only"
    BertConfig(vocab_size=100).save_pretrained(pickle_only)
    (pickle_only / "pytorch_model.bin").write_bytes(b"never unpickled")
    code, _, stderr = run(["evaluate", "--model", str(pickle_only)], capsys)
    assert code == 2 and "model.safetensors" in stderr


def test_output_directory_is_not_overwritten(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("data")
    code, _, stderr = run(["compress", "--model", str(model_dir), "--method", "svd", "--out", str(out)], capsys)
    assert code == 2 and "not empty" in stderr and (out / "keep.txt").read_text() == "data"


def test_entry_point_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "lmcompress.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "compress" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lmcompress.cli", "compress", "--method", "svd", "--keep", "2",
                          "--out", "/nonexistent/x"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "lmcompress compress: error: invalid options for method 'svd': keep: Input " \
                                 "should be less than or equal to 1"


def test_unreachable_hub_model_is_one_line(tmp_path, capsys):
    code, _, stderr = run(["evaluate", "--model", "no-such-org/no-such-model"], capsys)
    assert code == 2 and "could not be fetched from the Hugging Face hub" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_finetune_regression_task(model_dir, tmp_path, capsys):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    rows = ["index\tgenre\tsentence1\tsentence2\tscore"]
    rows += [f"{i}\tx\t{SENTENCES[i]}\t{SENTENCES[-i - 1]}\t{i % 5}.0" for i in range(8)]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("\n".join(rows) + "\n")
    base = tmp_path / "base"
    from transformers import BertConfig, BertModel

    from lmcompress.io.models import bundled_model_path  # a bare encoder (no head), like the bundled model
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(base)
    (base / "vocab.txt").write_text((bundled_model_path() / "vocab.txt").read_text())
    code, _, _ = run(["finetune", "--model", str(base), "--task", "stsb", "--data", str(folder), "--out",
                      str(tmp_path / "ft"), "--batch-size", "4", "--max-length", "16"], capsys)
    assert code == 0
    result_file = tmp_path / "r.json"
    code, stdout, _ = run(["evaluate", "--model", str(tmp_path / "ft"), "--data", str(folder), "--repeats", "2",
                           "--seq-len", "16", "--json", str(result_file)], capsys)
    assert code == 0, stdout
    result = json.loads(result_file.read_text())
    assert result["task"] == "stsb" and result["metric"]["name"] == "pearson"  # task taken from the model


def test_compress_with_a_budget_prints_and_saves_the_allocation(model_dir, csv_file, tmp_path, capsys):
    out = tmp_path / "budget"
    code, stdout, _ = run(["compress", "--model", str(model_dir), "--method", "whitened_svd", "--budget",
                           "params=0.5", "--calibration-mode", "one-shot", *data_args(csv_file),
                           "--calib-samples", "8", "--out", str(out)], capsys)
    assert code == 0, stdout
    manifest = json.loads((out / "lmcompress.json").read_text())
    stage = manifest["summary"]["stages"][0]
    assert stage["calibration_mode"] == "one_shot" and stage["allocation"]["strategy"] == "sensitivity"
    assert manifest["summary"]["params_after"] <= 0.5 * manifest["summary"]["params_before"]


@pytest.mark.parametrize("extra, message", [
    (["--method", "svd", "--budget", "params=2"], "less than or equal to 1"),
    (["--method", "svd", "--budget", "weights=0.5"], "--budget expects params=F"),
    (["--method", "svd", "--budget", "params=half"], "needs a number"),
    (["--method", "svd", "--budget", "params=0.5", "flops=0.5"], "one of them"),
    (["--method", "svd", "--keep", "0.5", "--budget", "params=0.5"], "drop keep/rank"),
    (["--method", "svd", "--rank", "4", "--budget", "params=0.5"], "drop keep/rank"),
    (["--method", "svd", "--keep", "0.5", "--allocation", "uniform"], "--allocation splits a --budget"),
    (["--method", "svd", "--budget", "params=0.0001", "--allocation", "uniform"], "budget too small"),
])
def test_bad_budget_input(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, _, stderr = run(["compress", "--model", str(model_dir), *extra, "--out", str(out)], capsys)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_unused_data_is_still_validated(model_dir, csv_file, tmp_path, capsys):
    code, _, stderr = run(["compress", "--model", str(model_dir), "--method", "svd", "--keep", "0.5",
                           "--task", "text-classification", "--data", str(csv_file), "--text-column", "nope",
                           "--label-column", "label", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "missing column 'nope'" in stderr


def test_unused_data_gets_a_warning(model_dir, csv_file, tmp_path, capsys, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="lmcompress"):
        code, _, _ = run(["compress", "--model", str(model_dir), "--method", "svd", "--keep", "0.5",
                          *data_args(csv_file), "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and any("not used" in r.getMessage() for r in caplog.records)


def refuse(what: str):
    def started(*args, **kwargs):
        raise AssertionError(f"{what} started")
    return started


@pytest.fixture
def no_evaluation(monkeypatch):
    """Bad arguments must be refused before any evaluation starts."""
    monkeypatch.setattr("lmcompress.evaluation.evaluate", refuse("evaluation"))


@pytest.mark.parametrize("extra, message", [
    (["--repeats", "0"], "--repeats must be at least 1 (got 0)"),
    (["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (["--latency-batch-size", "0"], "--latency-batch-size must be at least 1 (got 0)"),
    (["--max-samples", "0"], "--max-samples must be at least 1 (got 0)"),
    (["--seq-len", "1000"], "--seq-len 1000 is longer than the model's 128 positions"),
    (["--max-length", "129"], "--max-length 129 is longer than the model's 128 positions"),
])
def test_bad_evaluate_numbers_fail_before_evaluating(model_dir, csv_file, capsys, no_evaluation, extra, message):
    code, _, stderr = run(["evaluate", "--model", str(model_dir), *data_args(csv_file), *extra], capsys)
    assert code == 2 and stderr.strip() == f"lmcompress evaluate: error: {message}"


def test_option_that_names_a_recipe_parameter_is_one_line(model_dir, tmp_path, capsys):
    for item, message in [("targets=x", "'targets' is not a method option (use --targets)"),
                          ("calibration=1", "'calibration' is not a method option")]:
        code, _, stderr = run(["compress", "--model", str(model_dir), "--method", "svd", "--option", item,
                               "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and stderr.strip() == f"lmcompress compress: error: --option {item}: {message}"


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "inf"], "epochs: Input should be a finite number"),
    (["--lr", "nan"], "lr: Input should be a finite number"),
    (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    (["--seed", str(2**64)], "seed: Input should be less than"),
    (["--max-length", "1000"], "max_length 1000 is longer than the model's 128 positions"),
])
def test_bad_finetune_numbers_fail_before_training(model_dir, csv_file, tmp_path, capsys, monkeypatch, extra,
                                                    message):
    monkeypatch.setattr("torch.optim.AdamW", refuse("training"))
    code, _, stderr = run(["finetune", "--model", str(model_dir), *data_args(csv_file), "--out",
                           str(tmp_path / "ft"), *extra], capsys)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "ft").exists()


def test_demo_with_a_bad_keep_fails_before_fine_tuning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lmcompress.entrypoints.demo.finetune", refuse("fine-tuning"))
    code, _, stderr = run(["demo", "--keep", "0.5", "1.5", "--out", str(tmp_path / "demo")], capsys)
    assert code == 2 and stderr.strip() == ("lmcompress demo: error: invalid options for method 'svd': keep: "
                                            "Input should be less than or equal to 1")
    assert list(tmp_path.iterdir()) == []


_SLOW_COMMAND = """
import sys, time
from lmcompress import cli
from lmcompress.cli import demo
from lmcompress.io.saving import atomic_output_dir

def slow(args):
    with atomic_output_dir(args.out) as tmp:
        print(tmp, flush=True)
        time.sleep(60)

demo.run = slow
sys.exit(cli.main(["-q", "demo", "--out", sys.argv[1]]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signal_name, code, message", [("SIGTERM", 143, "terminated"),
                                                        ("SIGINT", 130, "interrupted")])
def test_signals_remove_the_temporary_output_directory(tmp_path, signal_name, code, message):
    import os
    import signal
    from pathlib import Path

    import lmcompress

    env = {**os.environ, "PYTHONPATH": str(Path(lmcompress.__file__).resolve().parents[1])}
    # a pytest-xdist worker ignores SIGINT and a child inherits that; a terminal's Ctrl-C meets the default handler
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_COMMAND, str(tmp_path / "out")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.name.startswith(".out.tmp-") and tmp.is_dir()
        proc.send_signal(getattr(signal, signal_name))
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code and message in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("contents", ["text,label\n" + "".join(f'"{s}",happy\n' for s in SENTENCES),
                                      "text\n" + "".join(f'"{s}"\n' for s in SENTENCES)])
def test_calibration_data_needs_no_labels_the_model_knows(model_dir, tmp_path, capsys, contents):
    calib = tmp_path / "calib.csv"
    calib.write_text(contents)
    code, stdout, stderr = run(["compress", "--model", str(model_dir), "--method", "whitened_svd", "--task",
                                "text-classification", "--data", str(calib), "--text-column", "text",
                                "--calib-samples", "8", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, stderr
    assert "compressed 12 of 12" in stdout


@pytest.mark.parametrize("dense", ["out", "out/dense", "."])
def test_dense_out_may_not_overlap_out(model_dir, tmp_path, capsys, monkeypatch, dense):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("keep")
    code, _, stderr = run(["compress", "--model", str(model_dir), "--method", "svd", "--out", "out",
                           "--dense-out", dense, "--overwrite"], capsys)
    assert code == 2 and stderr.strip().endswith("must be separate directories")
    assert (tmp_path / "out" / "previous.txt").read_text() == "keep"


def test_quiet_before_or_after_the_subcommand():
    from lmcompress.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-q", "methods"]).quiet and parser.parse_args(["methods", "-q"]).quiet
    assert parser.parse_args(["evaluate", "--quiet", "--repeats", "3"]).quiet
    assert not parser.parse_args(["methods"]).quiet


def test_columns_given_to_finetune_are_remembered(model_dir, tmp_path, capsys):
    folder = tmp_path / "reviews"
    folder.mkdir()
    rows = "review,mood\n" + "".join(f'"{s}",{"good" if i % 2 else "bad"}\n' for i, s in enumerate(SENTENCES))
    (folder / "train.csv").write_text(rows)
    (folder / "dev.csv").write_text(rows)
    code, _, stderr = run(["finetune", "--model", str(model_dir), "--task", "text-classification", "--data",
                           str(folder), "--text-column", "review", "--label-column", "mood", "--out",
                           str(tmp_path / "ft"), "--batch-size", "4", "--max-length", "16"], capsys)
    assert code == 0, stderr
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["lmcompress_columns"] == {"text_column": "review", "text_pair_column": None,
                                            "label_column": "mood"}
    code, stdout, stderr = run(["evaluate", "--model", str(tmp_path / "ft"), "--data", str(folder), "--repeats",
                                "1", "--seq-len", "16"], capsys)
    assert code == 0, stderr
    assert stdout.startswith("text-classification accuracy:")


def test_fast_mode_is_one_shot_with_a_small_sensitivity_sample(model_dir, csv_file, tmp_path, capsys):
    out = tmp_path / "fast"
    code, stdout, _ = run(["compress", "--model", str(model_dir), "--method", "whitened_svd", "--budget",
                           "params=0.5", "--fast", *data_args(csv_file), "--calib-samples", "8", "--out", str(out)],
                          capsys)
    assert code == 0, stdout
    from lmcompress.engine.recipe import Recipe

    recipe = Recipe.from_yaml(out / "recipe.yaml")
    assert recipe.calibration.mode == "one_shot" and recipe.stages[0].allocation.samples == 32
    code, _, stderr = run(["compress", "--model", str(model_dir), "--method", "whitened_svd", "--budget",
                           "params=0.5", "--fast", "--calibration-mode", "sequential", "--out",
                           str(tmp_path / "o")], capsys)
    assert code == 2 and "--fast already chooses" in stderr
