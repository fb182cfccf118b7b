"""Tests for task specs, data readers, the generated default task and metrics."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_DATA  # noqa: E402
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lmcompress.errors import DataError, LMCompressError
from lmcompress.tasks import (
    DEFAULT_TASK,
    METRICS,
    TASK_NAMES,
    Examples,
    compute_metrics,
    generate_sentiment,
    get_task,
    load_examples,
)
from lmcompress.tasks.embedded import DEV_SIZE, TRAIN_SIZE


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def tsv(*rows: str) -> str:
    return "".join(row + "\n" for row in rows)


# --- task registry -------------------------------------------------------------------------------------


def test_registry_contents() -> None:
    assert TASK_NAMES == ("sst2", "cola", "stsb", "mrpc", "rte", "qnli", "text-classification",
                          "embedded-sentiment", "language-modeling")
    assert DEFAULT_TASK == "embedded-sentiment"
    for name in TASK_NAMES:
        spec = get_task(name, text_column="t", label_column="l") if name == "text-classification" else get_task(name)
        assert spec.metric == spec.metrics[0]
        assert set(spec.metrics) <= set(METRICS)
        assert spec.is_regression == (name == "stsb")
    assert get_task("stsb").label_names is None
    assert get_task("rte").label_names == ("entailment", "not_entailment")


@pytest.mark.parametrize("alias, expected", [("SST-2", "sst2"), ("glue/sst2", "sst2"), ("STS-B", "stsb"),
                                             ("sts_b", "stsb"), ("CoLA", "cola"), ("glue/MRPC", "mrpc"),
                                             ("Text_Classification", "text-classification")])
def test_task_aliases(alias: str, expected: str) -> None:
    kwargs = {"text_column": "a", "label_column": "b"} if expected == "text-classification" else {}
    assert get_task(alias, **kwargs).name == expected


def test_unknown_task_lists_choices() -> None:
    with pytest.raises(DataError, match=r"unknown task 'mnli'; choose one of: sst2, cola"):
        get_task("mnli")
    assert issubclass(DataError, LMCompressError)


def test_text_classification_needs_columns() -> None:
    with pytest.raises(DataError, match="text column and a label column"):
        get_task("text-classification", text_column="text")
    spec = get_task("text-classification", text_column="review", text_pair_column="title", label_column="stars")
    assert (spec.text_column, spec.text_pair_column, spec.label_column) == ("review", "title", "stars")
    assert spec.label_names is None and not spec.is_regression


def test_glue_column_override() -> None:
    spec = get_task("sst2", text_column="text")
    assert spec.text_column == "text" and spec.label_names == ("negative", "positive")


# --- Examples ------------------------------------------------------------------------------------------


def test_examples_take_is_deterministic_subset() -> None:
    ex = Examples([f"t{i}" for i in range(50)], None, [i % 2 for i in range(50)], ("a", "b"))
    first, again, other = ex.take(10, seed=3), ex.take(10, seed=3), ex.take(10, seed=4)
    assert len(first) == 10 and first.texts == again.texts and first.texts != other.texts
    assert set(first.texts) <= set(ex.texts)
    assert all(first.labels[i] == int(first.texts[i][1:]) % 2 for i in range(10))
    assert len(ex.take(None)) == 50 and len(ex.take(500)) == 50
    assert ex.num_labels == 2
    assert Examples(["x"], ["y"], [1.5], None).num_labels == 1


# --- GLUE TSV formats ------------------------------------------------------------------------------------


def test_sst2_tsv(tmp_path: Path) -> None:
    write(tmp_path / "dev.tsv", tsv("sentence\tlabel", "a charming film \t1", 'a "quoted bad film\t0', "it works\t1"))
    ex = load_examples(get_task("sst2"), tmp_path, "dev")
    assert ex.texts == ["a charming film", 'a "quoted bad film', "it works"]
    assert ex.labels == [1, 0, 1] and ex.label_names == ("negative", "positive") and ex.text_pairs is None


def test_quote_does_not_swallow_lines(tmp_path: Path) -> None:
    rows = ['"opening quote never closed\t1', "second\t0", "third\t1"]
    path = write(tmp_path / "x.tsv", tsv("sentence\tlabel", *rows))
    assert len(load_examples(get_task("sst2"), path, "train")) == 3


def test_cola_headerless(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", tsv("gj04\t1\t\tThe sailors rode the breeze.", "gj04\t0\t*\tThe rope stretch over."))
    ex = load_examples(get_task("cola"), tmp_path, "train")
    assert ex.texts == ["The sailors rode the breeze.", "The rope stretch over."]
    assert ex.labels == [1, 0] and ex.label_names == ("unacceptable", "acceptable")


def test_stsb_floats_and_pairs(tmp_path: Path) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = ["0\tmain\tMSRvid\t2012\t0001\tnone\tnone\tA plane.\tAn air plane.\t5.000",
            "1\tmain\tMSRvid\t2012\t0004\tnone\tnone\tA flute.\tA large flute.\t3.800"]
    ex = load_examples(get_task("STS-B"), write(tmp_path / "dev.tsv", tsv(header, *rows)), "dev")
    assert ex.labels == [5.0, 3.8] and ex.text_pairs == ["An air plane.", "A large flute."]
    assert ex.label_names is None and ex.num_labels == 1


def test_stsb_non_numeric_score(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", tsv("sentence1\tsentence2\tscore", "a\tb\t4.0", "c\td\thigh"))
    with pytest.raises(DataError, match=r"dev\.tsv: line 3: label 'high' is not a finite number"):
        load_examples(get_task("stsb"), path, "dev")


def test_mrpc_with_bom(tmp_path: Path) -> None:
    text = tsv("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t702876\t702977\tHe said.\tHe stated.",
               "0\t2108705\t2108831\tYucaipa owned.\tIt sold.")
    path = write(tmp_path / "train.tsv", text, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    ex = load_examples(get_task("mrpc"), tmp_path, "train")
    assert ex.texts == ["He said.", "Yucaipa owned."] and ex.text_pairs == ["He stated.", "It sold."]
    assert ex.labels == [1, 0] and ex.label_names == ("not_equivalent", "equivalent")


@pytest.mark.parametrize("task, header", [("rte", "index\tsentence1\tsentence2\tlabel"),
                                          ("qnli", "index\tquestion\tsentence\tlabel")])
def test_string_labels(tmp_path: Path, task: str, header: str) -> None:
    path = write(tmp_path / "dev.tsv", tsv(header, "0\tA.\tB.\tnot_entailment", "1\tC.\tD.\tentailment",
                                           "2\tE.\tF.\t0"))
    ex = load_examples(get_task(task), path, "dev")
    assert ex.labels == [1, 0, 0] and ex.text_pairs == ["B.", "D.", "F."]


def test_wrong_field_count(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", tsv("sentence\tlabel", "good\t1", "bad\t0\textra"))
    with pytest.raises(DataError, match=r"dev\.tsv: line 3: expected 2 tab-separated fields, found 3"):
        load_examples(get_task("sst2"), path, "dev")
    cola = write(tmp_path / "cola.tsv", tsv("gj04\t1\tsentence only"))
    with pytest.raises(DataError, match=r"cola\.tsv: line 1: expected 4"):
        load_examples(get_task("cola"), cola, "dev")


def test_missing_column_names_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", tsv("sentence\tstars", "good\t1"))
    with pytest.raises(DataError) as info:
        load_examples(get_task("sst2"), path, "dev")
    message = str(info.value)
    assert message == f"{path}: missing column 'label' (columns: sentence, stars)"
    assert "\n" not in message


def test_missing_path_and_split_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data path not found: .*nowhere"):
        load_examples(get_task("sst2"), tmp_path / "nowhere", "dev")
    write(tmp_path / "train.tsv", tsv("sentence\tlabel", "ok\t1"))
    with pytest.raises(DataError, match=r"missing file dev\.tsv"):
        load_examples(get_task("sst2"), tmp_path, "dev")


def test_empty_files(tmp_path: Path) -> None:
    for path in (write(tmp_path / "empty.tsv", ""), write(tmp_path / "header.tsv", "sentence\tlabel\n"),
                 write(tmp_path / "empty.csv", ""), write(tmp_path / "empty.jsonl", "\n")):
        task = get_task("sst2") if path.suffix == ".tsv" else get_task(
            "text-classification", text_column="text", label_column="label")
        with pytest.raises(DataError, match=f"no examples in {path}"):
            load_examples(task, path, "dev")


def test_bad_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", tsv("sentence\tlabel", "a\t1", "b\tmaybe", "c\t7"))
    with pytest.raises(DataError, match=r"unknown label values 'maybe', '7' \(labels: negative, positive\)"):
        load_examples(get_task("sst2"), path, "dev")
    empty = write(tmp_path / "empty_label.tsv", tsv("sentence\tlabel", "a\t"))
    with pytest.raises(DataError, match="line 2: empty label"):
        load_examples(get_task("sst2"), empty, "dev")


def test_bad_split_and_max_samples() -> None:
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_examples(get_task(DEFAULT_TASK), None, "test")
    with pytest.raises(DataError, match="max_samples"):
        load_examples(get_task(DEFAULT_TASK), None, "dev", max_samples=0)


def test_glue_task_needs_data() -> None:
    with pytest.raises(DataError, match="task 'sst2' needs --data"):
        load_examples(get_task("sst2"), None, "dev")


# --- generic files ---------------------------------------------------------------------------------------


def text_task(pair: str | None = None):
    return get_task("text-classification", text_column="review", text_pair_column=pair, label_column="mood")


def test_csv_inferred_string_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", 'review,title,mood\n"great, really",A,happy\n"multi\nline",B,sad\nok,C,happy\n')
    ex = load_examples(text_task("title"), path, "train")
    assert ex.texts == ["great, really", "multi\nline", "ok"] and ex.text_pairs == ["A", "B", "C"]
    assert ex.label_names == ("happy", "sad") and ex.labels == [0, 1, 0]


def test_numeric_labels_sorted_numerically(tmp_path: Path) -> None:
    rows = [{"review": f"r{i}", "mood": label} for i, label in enumerate([10, 2, 1, 2])]
    path = write(tmp_path / "data.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    ex = load_examples(text_task(), path, "dev")
    assert ex.label_names == ("1", "2", "10") and ex.labels == [2, 1, 0, 1]


def test_jsonl_and_json_list(tmp_path: Path) -> None:
    rows = [{"review": "nice", "title": "t1", "mood": "pos"}, {"review": "awful", "title": "t2", "mood": "neg"}]
    jsonl = write(tmp_path / "d.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    as_list = write(tmp_path / "d.json", json.dumps(rows))
    for path in (jsonl, as_list):
        ex = load_examples(text_task("title"), path, "dev", label_names=["neg", "pos"])
        assert ex.labels == [1, 0] and ex.label_names == ("neg", "pos") and ex.text_pairs == ["t1", "t2"]


def test_given_label_names_unknown_value(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "review,mood\na,pos\nb,meh\nc,neg\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown label values 'meh' \(labels: neg, pos\)"):
        load_examples(text_task(), path, "dev", label_names=("neg", "pos"))


def test_generic_label_names_map_by_index_or_data_names(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", tsv("index\tsentence1\tsentence2\tlabel", "0\ta\tb\tnot_entailment",
                                           "1\tc\td\t0"))
    ex = load_examples(get_task("rte"), path, "dev", label_names=["LABEL_0", "LABEL_1"])
    assert ex.labels == [1, 0] and ex.label_names == ("LABEL_0", "LABEL_1")
    numeric = write(tmp_path / "n.csv", "review,mood\na,0\n")
    with pytest.raises(DataError, match="unknown label values '0'"):
        load_examples(text_task(), numeric, "dev", label_names=["1", "2"])


def test_generic_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\na,1\n")
    with pytest.raises(DataError, match=r"d\.csv: missing column 'review' \(columns: text, label\)"):
        load_examples(text_task(), path, "dev")
    jsonl = write(tmp_path / "d.jsonl", '{"review": "a", "mood": 1}\n{"review": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: missing column 'mood' \(columns: review\)"):
        load_examples(text_task(), jsonl, "dev")
    bad = write(tmp_path / "bad.jsonl", '{"review": "a", "mood": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: invalid JSON"):
        load_examples(text_task(), bad, "dev")
    ragged = write(tmp_path / "ragged.csv", "review,mood\na,1\nb,0,extra\n")
    with pytest.raises(DataError, match=r"ragged\.csv: line 3: expected 2 comma-separated fields, found 3"):
        load_examples(text_task(), ragged, "dev")


def test_folder_of_csv_splits_and_unsupported_type(tmp_path: Path) -> None:
    write(tmp_path / "splits" / "validation.csv", "review,mood\nx,a\ny,b\n")
    assert len(load_examples(text_task(), tmp_path / "splits", "dev")) == 2
    with pytest.raises(DataError, match="unsupported data file type '.parquet'"):
        load_examples(text_task(), write(tmp_path / "d.parquet", "x"), "dev")


def test_max_samples(tmp_path: Path) -> None:
    rows = "".join(f"text {i}\t{i % 2}\n" for i in range(40))
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\n" + rows)
    first = load_examples(get_task("sst2"), path, "dev", max_samples=7, seed=5)
    again = load_examples(get_task("sst2"), path, "dev", max_samples=7, seed=5)
    assert len(first) == 7 and first.texts == again.texts


# --- Hugging Face datasets -------------------------------------------------------------------------------


def test_saved_dataset_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "not_entailment"])})
    train = datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0, 1]},
                                       features=features)
    dev = datasets.Dataset.from_dict({"sentence1": ["e"], "sentence2": ["f"], "label": [1]}, features=features)
    datasets.DatasetDict({"train": train, "validation": dev}).save_to_disk(str(tmp_path / "dict"))
    train.save_to_disk(str(tmp_path / "single"))

    rte = get_task("rte")
    got = load_examples(rte, tmp_path / "dict", "train")
    assert got.texts == ["a", "b"] and got.text_pairs == ["c", "d"] and got.labels == [0, 1]
    assert load_examples(rte, tmp_path / "dict", "dev").labels == [1]
    assert load_examples(rte, tmp_path / "single", "dev").labels == [0, 1]  # a plain Dataset ignores split
    classify = get_task("text-classification", text_column="sentence1", label_column="label")
    assert load_examples(classify, tmp_path / "dict", "train").label_names == ("entailment", "not_entailment")

    datasets.DatasetDict({"train": train}).save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(DataError, match="no split for 'dev'.*splits: train"):
        load_examples(rte, tmp_path / "train_only", "dev")


def test_saved_dataset_hf_glue_columns(tmp_path: Path) -> None:
    """HF `glue` configs name columns differently from the TSVs (stsb 'label', mrpc 'sentence1')."""
    datasets = pytest.importorskip("datasets")
    stsb = {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.5, 1.0], "idx": [0, 1]}
    datasets.Dataset.from_dict(stsb).save_to_disk(str(tmp_path / "stsb"))
    assert load_examples(get_task("stsb"), tmp_path / "stsb", "dev").labels == [4.5, 1.0]
    mrpc = {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [1, 0], "idx": [0, 1]}
    datasets.Dataset.from_dict(mrpc).save_to_disk(str(tmp_path / "mrpc"))
    got = load_examples(get_task("mrpc"), tmp_path / "mrpc", "dev")
    assert got.labels == [1, 0] and got.text_pairs == ["c", "d"]
    with pytest.raises(DataError, match="missing column 'score2'"):
        load_examples(get_task("stsb", label_column="score2"), tmp_path / "stsb", "dev")


def test_hub_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read these variables at import time, so patch the already-imported values too.
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        if module in sys.modules:
            for name in names:
                monkeypatch.setattr(sys.modules[module], name, True, raising=False)
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_examples(get_task("sst2"), "hf:glue/sst2", "dev")
    message = str(info.value)
    assert message.startswith("could not load dataset 'glue/sst2' from the Hugging Face hub (offline?): ")
    assert "\n" not in message and time.monotonic() - start < 15


# --- embedded default task -------------------------------------------------------------------------------


def test_generate_sentiment_deterministic_and_balanced() -> None:
    first = generate_sentiment(500, seed=7)
    assert first == generate_sentiment(500, seed=7) and first != generate_sentiment(500, seed=8)
    counts = Counter(label for _, label in first)
    assert set(counts) == {0, 1} and 0.4 < counts[1] / 500 < 0.6
    assert all(len(text.split()) <= 25 and text.endswith(".") for text, _ in first)
    words = {word.strip(",.") for text, _ in first for word in text.lower().split()}
    assert {"not", "never", "hardly", "but", "although", "very", "somewhat", "extremely"} <= words


def test_embedded_task_splits() -> None:
    task = get_task(DEFAULT_TASK)
    train, dev = load_examples(task, None, "train"), load_examples(task, "embedded", "dev")
    assert (len(train), len(dev)) == (TRAIN_SIZE, DEV_SIZE)
    assert train.label_names == dev.label_names == ("negative", "positive") and train.num_labels == 2
    assert train.texts[:50] != dev.texts[:50]
    seen = set(train.texts)
    assert sum(text in seen for text in dev.texts) < 0.1 * len(dev)
    assert load_examples(task, None, "dev").texts == dev.texts
    sample = load_examples(task, None, "train", max_samples=100, seed=1)
    assert len(sample) == 100 and set(sample.texts) <= seen


def test_embedded_model_label_names_map() -> None:
    """A model config with generic names (LABEL_0/1) still reads the embedded task."""
    ex = load_examples(get_task(DEFAULT_TASK), None, "dev", label_names=["LABEL_0", "LABEL_1"])
    assert ex.labels == load_examples(get_task(DEFAULT_TASK), None, "dev").labels


# --- metrics ---------------------------------------------------------------------------------------------


def test_classification_metrics_match_sklearn() -> None:
    refs, preds = [0, 1, 1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 1, 1, 0]
    mrpc = compute_metrics(get_task("mrpc"), preds, refs)
    assert set(mrpc) == {"f1", "accuracy"}
    assert mrpc["f1"] == pytest.approx(f1_score(refs, preds)) and mrpc["accuracy"] == pytest.approx(0.75)
    cola = compute_metrics(get_task("cola"), preds, refs)
    assert cola["matthews"] == pytest.approx(matthews_corrcoef(refs, preds))
    assert compute_metrics(get_task("sst2"), refs, refs) == {"accuracy": 1.0}
    assert compute_metrics(get_task("cola"), refs, refs)["matthews"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in cola.values())


def test_text_classification_macro_f1() -> None:
    task = get_task("text-classification", text_column="t", label_column="l")
    refs, preds = [0, 1, 2, 2, 1], [0, 2, 2, 2, 1]
    got = compute_metrics(task, preds, refs)
    assert got["f1"] == pytest.approx(f1_score(refs, preds, average="macro"))
    assert got["accuracy"] == pytest.approx(accuracy_score(refs, preds))


def test_regression_metrics() -> None:
    refs, preds = [0.0, 1.0, 2.5, 4.0, 5.0], [0.5, 1.5, 2.0, 4.5, 4.0]
    got = compute_metrics(get_task("stsb"), preds, refs)
    assert got["pearson"] == pytest.approx(pearsonr(preds, refs)[0])
    assert got["spearman"] == pytest.approx(spearmanr(preds, refs)[0])
    assert compute_metrics(get_task("stsb"), refs, refs)["pearson"] == pytest.approx(1.0)
    constant = compute_metrics(get_task("stsb"), [2.0] * 5, refs)
    assert constant == {"pearson": 0.0, "spearman": 0.0} and not any(math.isnan(v) for v in constant.values())


def test_metric_input_checks() -> None:
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        compute_metrics(get_task("sst2"), [0, 1], [0, 1, 1])
    assert compute_metrics(get_task("stsb"), [[1.0], [2.0], [3.0]], [1.0, 2.0, 3.5])["pearson"] > 0.9


# --- real GLUE data --------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, folder, rows", [("sst2", "SST-2", 872), ("cola", "CoLA", 1043),
                                                ("stsb", "STS-B", 1500)])
def test_real_glue_dev(task: str, folder: str, rows: int) -> None:
    path = SHARED_DATA / "glue" / folder
    if not (path / "dev.tsv").is_file():
        pytest.skip(f"shared GLUE data not present at {path}")
    spec = get_task(task)
    ex = load_examples(spec, path, "dev")
    assert len(ex) == rows and all(text for text in ex.texts)
    if spec.is_regression:
        assert all(0.0 <= label <= 5.0 for label in ex.labels) and ex.text_pairs is not None
    else:
        assert set(ex.labels) == {0, 1}


# --- label ids: the task's naming first, then the model's classes -----------------------------------------


def test_integer_labels_map_through_the_task_names_to_the_model(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", tsv("sentence\tlabel", "good\t1", "bad\t0", "fine\tpositive"))
    for model in (("positive", "negative"), ("POSITIVE", "NEGATIVE")):
        ex = load_examples(get_task("sst2"), path, "dev", label_names=model)
        assert ex.label_names == model and ex.labels == [0, 1, 0]
    with pytest.raises(DataError, match=r"dev\.tsv: the data's labels \(negative, positive\) do not match the "
                                        r"model's \(good, bad\)$"):
        load_examples(get_task("sst2"), path, "dev", label_names=("good", "bad"))


def test_dev_split_numbers_classes_as_the_training_split_does(tmp_path: Path) -> None:
    write(tmp_path / "data" / "train.csv", "review,mood\na,neg\nb,neu\nc,pos\nd,neu\n")
    write(tmp_path / "data" / "dev.csv", "review,mood\ne,neu\nf,pos\n")
    train, dev = (load_examples(text_task(), tmp_path / "data", split) for split in ("train", "dev"))
    assert train.label_names == dev.label_names == ("neg", "neu", "pos")
    assert dev.labels == [1, 2]
    write(tmp_path / "data" / "dev.csv", "review,mood\ne,neu\nf,meh\n")
    with pytest.raises(DataError, match=r"unknown label values 'meh' \(labels: neg, neu, pos\)"):
        load_examples(text_task(), tmp_path / "data", "dev")


def test_examples_without_labels(tmp_path: Path) -> None:
    """Calibration reads texts only: no label column needed, and labels the task does not know are fine."""
    unlabelled = write(tmp_path / "calib.csv", "review\nfirst\nsecond\n")
    ex = load_examples(text_task(), unlabelled, "train", labels=False)
    assert ex.texts == ["first", "second"] and ex.labels == [None, None] and ex.label_names is None
    odd = write(tmp_path / "train.tsv", tsv("sentence\tlabel", "a\tmaybe", "b\t"))
    assert load_examples(get_task("sst2"), odd, "train", labels=False).texts == ["a", "b"]
    write(tmp_path / "bare" / "train.tsv", tsv("sentence", "only text"))
    assert load_examples(get_task("sst2"), tmp_path / "bare", "train", labels=False).texts == ["only text"]
    with pytest.raises(DataError, match="missing column 'label'"):
        load_examples(get_task("sst2"), tmp_path / "bare", "train")
