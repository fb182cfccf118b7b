"""Review fixes: F1's positive class, numeric CSV labels, quoted TSV, distillation run folders, repeated options."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert, save_classifier, write_sentiment_csv
from sklearn.metrics import f1_score

from lmcompress.cli import build_parser, main
from lmcompress.cli.compress import recipe_from_args as _recipe_from_args
from lmcompress.cli.distill import distill_config as _distill_config
from lmcompress.errors import ModelLoadError
from lmcompress.tasks import compute_metrics, get_task, load_examples


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def run(argv, capsys):
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- item 2: binary F1 scores the task's positive class, whatever the model's order -----------------------


def test_f1_positive_class_follows_the_class_name_through_the_model_ids() -> None:
    task_refs, task_preds = [1, 1, 0, 1, 0, 0, 1, 1], [1, 0, 0, 1, 1, 0, 1, 0]  # 1 = equivalent (GLUE)
    glue_f1 = f1_score(task_refs, task_preds)
    flipped = ("equivalent", "not_equivalent")  # the model numbers "equivalent" 0
    refs, preds = [1 - r for r in task_refs], [1 - p for p in task_preds]
    got = compute_metrics(get_task("mrpc"), preds, refs, label_names=flipped)
    assert got["f1"] == pytest.approx(glue_f1)
    assert got["f1"] != pytest.approx(f1_score(refs, preds))  # the F1 of "not_equivalent" differs here
    same_order = compute_metrics(get_task("mrpc"), task_preds, task_refs, label_names=("not_equivalent", "equivalent"))
    assert same_order["f1"] == pytest.approx(glue_f1)
    generic = compute_metrics(get_task("mrpc"), task_preds, task_refs, label_names=("LABEL_0", "LABEL_1"))
    assert generic["f1"] == pytest.approx(glue_f1)


def test_evaluate_mrpc_f1_on_a_model_with_equivalent_first(tmp_path: Path, tokenizer) -> None:
    from lmcompress.evaluation import evaluate
    from lmcompress.io.models import model_label_names

    model = make_tiny_bert(tokenizer.vocab_size)
    model.config.id2label, model.config.label2id = {0: "equivalent", 1: "not_equivalent"}, {"equivalent": 0,
                                                                                             "not_equivalent": 1}
    with torch.no_grad():  # always predicts class 0: "equivalent"
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, -5.0]))
    quality = [1, 0, 1, 1, 0, 1]
    rows = [f"{q}\t{i}\t{i + 100}\tsentence {i}.\tanother {i}." for i, q in enumerate(quality)]
    write(tmp_path / "dev.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "\n".join(rows) + "\n")
    task = get_task("mrpc")
    dev = load_examples(task, tmp_path, "dev", label_names=model_label_names(model))
    result = evaluate(model, tokenizer, task, dev, latency_repeats=1, latency_seq_len=8, flops_seq_len=8,
                      progress=False)
    expected = f1_score(quality, [1] * len(quality))  # every pair called equivalent, GLUE's positive class
    assert result.metrics["f1"] == pytest.approx(expected) and expected > 0.5


# --- item 7: numeric labels 1 and 1.0 are one class -------------------------------------------------------


def text_task():
    return get_task("text-classification", text_column="review", label_column="mood")


def test_csv_numeric_labels_are_normalised(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "review,mood\na,1\nb,1.0\nc,0\nd,0.0\ne,2.50\nf,2.5\n")
    ex = load_examples(text_task(), path, "train")
    assert ex.label_names == ("0", "1", "2.5")
    assert ex.labels == [1, 1, 0, 0, 2, 2]
    strings = write(tmp_path / "s.csv", "review,mood\na,pos\nb,Pos\nc,neg\n")
    assert load_examples(text_task(), strings, "train").label_names == ("Pos", "neg", "pos")


def test_numeric_labels_normalised_across_splits_and_model_names(tmp_path: Path) -> None:
    write(tmp_path / "data" / "train.csv", "review,mood\na,0.0\nb,1.0\nc,2.0\n")
    write(tmp_path / "data" / "dev.csv", "review,mood\nd,2\ne,1\n")
    train, dev = (load_examples(text_task(), tmp_path / "data", split) for split in ("train", "dev"))
    assert train.label_names == dev.label_names == ("0", "1", "2") and dev.labels == [2, 1]
    old_model = load_examples(text_task(), tmp_path / "data", "dev", label_names=("0.0", "1.0", "2.0"))
    assert old_model.labels == [2, 1]


# --- item 8: GLUE's files without quoting, other TSV files with standard quoting --------------------------


def test_own_tsv_file_is_read_with_quoting(tmp_path: Path) -> None:
    path = write(tmp_path / "my.tsv", 'review\tmood\n"say ""hi""\tthere"\tpos\n"plain"\tneg\n')
    ex = load_examples(text_task(), path, "train")
    assert ex.texts == ['say "hi"\tthere', "plain"] and ex.label_names == ("neg", "pos")


def test_glue_files_keep_quotes(tmp_path: Path) -> None:
    write(tmp_path / "SST-2" / "train.tsv", 'sentence\tlabel\n"a quote never closed\t1\nsecond\t0\n')
    task = get_task("text-classification", text_column="sentence", label_column="label")
    ex = load_examples(task, tmp_path / "SST-2", "train")  # a GLUE folder, whatever the task
    assert ex.texts == ['"a quote never closed', "second"]
    glue = write(tmp_path / "x.tsv", 'sentence\tlabel\n"quoted"\t1\n')
    assert load_examples(get_task("sst2"), glue, "train").texts == ['"quoted"']


# --- item 17: a distillation run folder is a model -------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path, tokenizer) -> Path:
    from lmcompress.training.distillation.checkpoint import CheckpointStore

    model = make_tiny_bert(tokenizer.vocab_size)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    store = CheckpointStore(tmp_path / "run")
    store.prepare(resume=False, overwrite=False)
    store.save_best(model, tokenizer, {"step": 3, "best": {"divergence": 0.1}})
    return tmp_path / "run"


def test_resolve_model_takes_a_run_folders_best(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lmcompress.io.models import resolve_model

    with caplog.at_level(logging.INFO, logger="lmcompress"):
        location, local = resolve_model(run_dir)
    assert Path(location) == run_dir / "best" and local
    assert "distillation run" in caplog.text and str(run_dir / "best") in caplog.text
    with pytest.raises(ModelLoadError, match="model directory has no config.json"):
        resolve_model(run_dir / "checkpoints")


def test_evaluate_cli_on_a_run_folder(run_dir: Path, tmp_path: Path, capsys) -> None:
    data = write_sentiment_csv(tmp_path / "data.csv", SENTENCES)
    code, stdout, err = run(["evaluate", "--model", str(run_dir), "--task", "text-classification", "--data",
                             str(data), "--text-column", "text", "--label-column", "label", "--repeats", "1",
                             "--seq-len", "8"], capsys)
    assert code == 0, err
    assert "accuracy" in stdout


# --- item 20: repeated options add up; one key with two values is an error --------------------------------


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_repeated_compress_options_add_up() -> None:
    args = parse("compress", "--method", "prune", "--keep", "0.5", "--option", "score=magnitude",
                 "--option", "compensate=none", "--out", "o", "--targets", "a", "--targets", "b",
                 "--ignore", "c", "--ignore", "d")
    options = _recipe_from_args(args).stages[0].options
    assert options["score"] == "magnitude" and options["compensate"] == "none"
    assert args.targets == ["a", "b"] and args.ignore == ["c", "d"]
    args = parse("compress", "--method", "quantize", "--option", "bits=4", "--option", "scheme=weight_only",
                 "--option", "group_size=128", "--out", "o")
    options = _recipe_from_args(args).stages[0].options
    assert (options["bits"], options["scheme"], options["group_size"]) == (4, "weight_only", 128)


def test_repeated_budget_adds_up() -> None:
    args = parse("compress", "--method", "whitened_svd", "--budget", "flops=0.5", "--budget", "seq_len=64",
                 "--out", "o")
    budget = _recipe_from_args(args).stages[0].budget
    assert (budget.flops, budget.seq_len) == (0.5, 64)


def test_repeated_distill_options_and_lists_add_up() -> None:
    args = parse("distill", "--teacher", "t", "--student", "s", "--time", "1m", "--out", "o", "--option",
                 "hidden_weight=0.5", "--option", "ce_weight=0.25", "--phases", "local", "--phases", "global")
    config = _distill_config(args)
    assert (config.hidden_weight, config.ce_weight) == (0.5, 0.25)
    assert list(config.phases) == ["local", "global"]
    assert parse("demo", "--keep", "0.5", "--keep", "0.2").keep == [0.5, 0.2]
    assert parse("sweep", "--grid", "g", "--out", "o", "--baselines", "dense", "--baselines", "int8").baselines == [
        "dense", "int8"]


@pytest.mark.parametrize("argv, message", [
    (["compress", "--method", "prune", "--keep", "0.5", "--option", "score=kcm", "--option", "score=magnitude"],
     "--option score is given twice, as 'kcm' and 'magnitude'"),
    (["compress", "--method", "svd", "--budget", "params=0.5", "--budget", "params=0.3"],
     "--budget params is given twice, as '0.5' and '0.3'"),
    (["distill", "--teacher", "t", "--student", "s", "--time", "1m", "--option", "ce_weight=0.5",
      "--option", "ce_weight=1"], "--option ce_weight is given twice, as '0.5' and '1'"),
])
def test_a_key_given_twice_with_two_values_is_one_error(tmp_path: Path, capsys, argv, message) -> None:
    code, _, err = run([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_key_given_twice_with_one_value_is_fine() -> None:
    args = parse("compress", "--method", "prune", "--keep", "0.5", "--option", "score=kcm", "--option",
                 "score=kcm", "--out", "o")
    assert _recipe_from_args(args).stages[0].options["score"] == "kcm"


def test_list_defaults_are_replaced_not_extended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmcompress.entrypoints.demo

    keeps = []
    monkeypatch.setattr(lmcompress.entrypoints.demo, "run_demo", lambda out, **kw: keeps.append(kw["keeps"]))
    assert main(["-q", "demo", "--out", str(tmp_path / "a")]) == 0
    assert main(["-q", "demo", "--out", str(tmp_path / "b"), "--keep", "0.4", "--keep", "0.2"]) == 0
    assert [list(k) for k in keeps] == [[0.5, 0.3], [0.4, 0.2]]
    sweep = ("sweep", "--grid", "g", "--out", "o")
    assert parse(*sweep, "--baselines", "int8").baselines == ["int8"]
    assert parse(*sweep, "--baselines").baselines == []


def test_model_dir_without_config_still_fails(tmp_path: Path, tokenizer) -> None:
    from lmcompress.io.models import resolve_model

    save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "m")
    assert resolve_model(tmp_path / "m")[0] == str(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(tmp_path / "empty")
