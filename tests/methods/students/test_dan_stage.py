"""The `dan` recipe stage: the whole model replaced by a DAN student, later stages acting on it, saved and reloaded
with its n-grams, through the API and the CLI; what it refuses, in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert

import lmcompress
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import DataError, LMCompressError, RecipeError
from lmcompress.kernels.ngrams import NgramFeaturizer
from lmcompress.layers import QuantizedEmbedding, QuantizedLinear
from lmcompress.layers.dan import DAN
from lmcompress.tasks import Examples

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"dim": 8, "hidden": 8, "epochs": 1, "subword": 4}


def examples(pairs: bool = False) -> Examples:
    return Examples(texts=SENTENCES, text_pairs=SENTENCES[::-1] if pairs else None,
                    labels=[i % 2 for i in range(len(SENTENCES))], label_names=("negative", "positive"))


def predictions(model, tokenizer) -> torch.Tensor:
    with torch.inference_mode():
        return model(**tokenizer(SENTENCES + ["an unseen wonderfulness"], padding=True, return_tensors="pt")).logits


@pytest.mark.parametrize("later", [[], [{"method": "quantize", "options": {"scheme": "weight_only"}}],
                                   [{"method": "quantize", "targets": ["hidden"], "options": {"scheme": "dynamic"}}]])
def test_the_student_replaces_the_model_later_stages_act_on_it_and_it_reloads_exactly(later, tokenizer, tmp_path):
    teacher = make_tiny_bert(tokenizer.vocab_size)
    recipe = Recipe.from_dict({"stages": [{"method": "dan", "options": SMALL}, *later]})
    summary = lmcompress.compress(teacher, recipe, tokenizer, examples(), progress=False, timing=False)
    student, featurizer = summary.model, summary.tokenizer
    assert isinstance(student, DAN) and isinstance(featurizer, NgramFeaturizer) and featurizer.subword == 4
    assert type(teacher).__name__ == "BertForSequenceClassification"     # the caller's model is left as it was
    assert "replaced the BertForSequenceClassification" in summary.describe()
    if later:
        assert isinstance(student.hidden[0], QuantizedLinear)
        assert isinstance(student.embedding, QuantizedEmbedding) == (later[0]["options"]["scheme"] == "weight_only")
    lmcompress.save(student, tmp_path / "dan", featurizer, recipe, extra={"summary": summary.to_dict()})
    loaded = lmcompress.load(tmp_path / "dan")
    assert isinstance(loaded, DAN) and loaded.featurizer.subword == 4
    assert Recipe.from_yaml(tmp_path / "dan" / "recipe.yaml") == recipe
    torch.testing.assert_close(predictions(loaded, loaded.featurizer), predictions(student, featurizer),
                               atol=0, rtol=0)


def test_it_must_be_the_first_stage_and_refuses_in_one_line(tokenizer):
    with pytest.raises(RecipeError, match="stage 2 \\(dan\\) replaces the whole model") as err:
        Recipe.from_dict({"stages": [{"method": "quantize"}, {"method": "dan"}]})
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="invalid options for method 'dan'.*shortest is 3") as err:
        Recipe.single("dan", subword=2)
    assert "\n" not in str(err.value)
    teacher = make_tiny_bert(tokenizer.vocab_size)
    cases = [(teacher, Recipe.single("dan", min_count=99), examples(), DataError, "vocabulary is empty"),
             (teacher, Recipe.single("dan"), examples(pairs=True), DataError, "text pairs"),
             (teacher, Recipe.single("dan"), Examples([*SENTENCES, " "], None, [None] * 13, None),
              DataError, "text 12 has no features"),
             (teacher.bert, Recipe.single("dan"), examples(), LMCompressError, "sequence classifier")]
    for model, recipe, data, kind, words in cases:
        with pytest.raises(kind, match=words) as err:
            lmcompress.compress(model, recipe, tokenizer, data, progress=False, timing=False)
        assert "\n" not in str(err.value)


def test_cli_compress_with_method_dan_saves_the_student(tokenizer, tmp_path, capsys):
    from lmcompress.cli import main

    teacher = make_tiny_bert(tokenizer.vocab_size)
    teacher.config.id2label, teacher.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    lmcompress.save(teacher, tmp_path / "teacher", tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(SENTENCES)))
    common = ["compress", "--model", str(tmp_path / "teacher"), "--method", "dan", "--task", "sst2", "--data",
              str(data), "--quiet", "--no-timing", "--option", "dim=8", "hidden=8", "epochs=1", "label_epochs=1"]
    assert main([*common, "--out", str(tmp_path / "dan")]) == 0
    assert "DAN student" in capsys.readouterr().out
    model, featurizer = lmcompress.load_model(str(tmp_path / "dan"))
    assert isinstance(model, DAN) and isinstance(featurizer, NgramFeaturizer)
    assert main([*common, "--out", str(tmp_path / "bad"), "--dense-out", str(tmp_path / "dense")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--dense-out" in err and "\n" not in err and not (tmp_path / "bad").exists()
    no_data = [a for a in common if a not in ("--task", "sst2", "--data", str(data))]
    assert main([*no_data, "--out", str(tmp_path / "bad")]) == 2      # not the embedded demo texts
    err = capsys.readouterr().err.strip()
    assert "give --data" in err and "\n" not in err and not (tmp_path / "bad").exists()
