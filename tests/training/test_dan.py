"""The DAN student: n-gram features, distillation towards a teacher, save/load, evaluation, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert
from pydantic import ValidationError

from lmcompress.errors import DataError, LMCompressError, validation_message
from lmcompress.evaluation.efficiency import count_flops, measure_latency, parameter_counts
from lmcompress.io.saving import load, save
from lmcompress.kernels.ngrams import NgramFeaturizer, ngrams, words
from lmcompress.layers.dan import DAN
from lmcompress.training.dan import (
    DANOptions,
    distill_dan,
    drop_features,
    label_augmented,
    teacher_outputs,
    teacher_targets,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ngrams_and_the_vocabulary_keeps_the_most_frequent_under_the_limit():
    assert ngrams(words("The cat, sat"), 2) == ["the", "cat", ",", "sat", "the cat", "cat ,", ", sat"]
    texts = ["a b", "a b", "a c", "d"]
    featurizer = NgramFeaturizer.build(texts, order=2, table=3)
    assert list(featurizer.vocab) == ["a", "a b", "b"]     # counts 3, 2, 2 (ties alphabetical)
    assert featurizer.vocab_size == 4
    assert NgramFeaturizer.build(texts, order=1, min_count=2).vocab == {"a": 1, "b": 2}
    batch = featurizer(["a b", "c d"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[1, 3, 2], [0, 0, 0]]     # unseen n-grams have no id
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 0]]


def test_hashing_is_stable_and_inside_the_table():
    a = NgramFeaturizer.build([], order=3, hash_size=17)
    ids = a.ids("one two three four")
    assert len(ids) == 4 + 3 + 2 and all(1 <= i <= 17 for i in ids)
    assert NgramFeaturizer.from_json(a.to_json()).ids("one two three four") == ids


def test_subwords_give_an_unseen_word_the_features_of_the_characters_it_shares():
    seen = ["the cats sat", "a hat"]
    with_subwords = NgramFeaturizer.build(seen, order=2, subword=4)
    assert with_subwords.ids("cat") and not NgramFeaturizer.build(seen, order=2).ids("cat")
    assert "#<ca" in with_subwords.vocab and "#ats>" in with_subwords.vocab and "#<c" not in with_subwords.vocab
    assert {"#<cat", "#cat>"} <= set(with_subwords.grams("cat")) and "cat" in with_subwords.grams("cat")
    # a pair's second text gets its subwords too, marked apart from the first text's
    pair = NgramFeaturizer.build(["the", "x"], order=1, subword=3).grams("x", prefix="2|")
    assert pair == ["2|x", "2|#<x>"]
    hashed = NgramFeaturizer.build([], order=1, hash_size=50, subword=5)
    assert len(hashed.ids("cat")) == 1 + 3 + 2 + 1     # "cat", then 3-, 4- and 5-grams of "<cat>"


def test_subwords_round_trip_and_an_older_file_loads_without_them():
    featurizer = NgramFeaturizer.build(["the cats sat"], order=1, subword=4)
    again = NgramFeaturizer.from_json(featurizer.to_json())
    assert again.subword == 4 and again.vocab == featurizer.vocab and again.ids("cat") == featurizer.ids("cat")
    plain = NgramFeaturizer.build(["the cats sat"], order=1)
    text = plain.to_json()
    assert json.loads(text) == {"format": "lmcompress-ngrams/1", "order": 1, "lowercase": True, "hash_size": None,
                                "vocab": ["cats", "sat", "the"]}      # as before subwords: older readers read it
    assert NgramFeaturizer.from_json(text).subword == 0
    assert json.loads(featurizer.to_json())["format"] == "lmcompress-ngrams/2"


def test_subword_below_three_is_refused_in_one_line():
    with pytest.raises(ValidationError) as err:
        DANOptions(subword=2)
    assert "shortest is 3" in validation_message(err.value) and "\n" not in validation_message(err.value)
    with pytest.raises(DataError, match="shortest is 3"):
        NgramFeaturizer.build(["a"], subword=1)


def test_empty_vocabulary_and_text_without_features_are_one_line_errors():
    with pytest.raises(DataError, match="vocabulary is empty"):
        NgramFeaturizer.build(["a", "b"], min_count=5)
    with pytest.raises(DataError, match="no features"):
        NgramFeaturizer.build(["a b"])(["a", "   "])


def teacher_and_texts(tokenizer):
    teacher = make_tiny_bert(tokenizer.vocab_size, seed=3)
    texts = SENTENCES * 4
    return teacher, texts


def test_the_student_learns_to_agree_with_its_teacher(tokenizer):
    teacher, texts = teacher_and_texts(tokenizer)
    # a random tiny teacher is near-uniform and one-sided: sharpen it and centre it on these sentences, so that it
    # splits them between the classes and agreement means something
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        teacher.classifier.weight.mul_(50)
        logits = teacher(**batch).logits
        teacher.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median() - 1e-3
    options = DANOptions(ngram=2, dim=16, hidden=16, epochs=60, batch_size=8, dropout=0.0, embedding_lr=0.05)
    result = distill_dan(teacher, tokenizer, texts, options=options)
    with torch.inference_mode():
        wanted = teacher(**batch).logits.argmax(-1)
        got = result.model(**result.model.featurizer(SENTENCES)).logits.argmax(-1)
    assert len(set(wanted.tolist())) == 2
    assert (got == wanted).float().mean() == 1.0
    assert result.report["soft_losses"][-1] < result.report["soft_losses"][0] / 5


def test_save_and_load_give_the_same_outputs_and_it_is_timed_like_any_model(tokenizer, tmp_path):
    teacher, texts = teacher_and_texts(tokenizer)
    model = distill_dan(teacher, tokenizer, texts, options=DANOptions(dim=8, hidden=8, epochs=1)).model
    save(model, tmp_path / "dan")
    loaded = load(tmp_path / "dan")
    assert isinstance(loaded, DAN) and (tmp_path / "dan" / "ngrams.json").is_file()
    batch = model.featurizer(SENTENCES)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    assert parameter_counts(loaded)["total"] == sum(p.numel() for p in model.parameters())
    assert 0 < count_flops(loaded) < 10_000
    assert measure_latency(loaded, batch_size=8, repeats=2)["median_ms"] > 0


def test_a_subword_student_saves_and_loads_through_lmcompress_load(tokenizer, tmp_path):
    import lmcompress

    teacher, texts = teacher_and_texts(tokenizer)
    model = distill_dan(teacher, tokenizer, texts, options=DANOptions(dim=8, hidden=8, epochs=1, subword=5)).model
    lmcompress.save(model, tmp_path / "dan")
    loaded = lmcompress.load(tmp_path / "dan")
    assert loaded.featurizer.subword == 5 and loaded.featurizer.vocab == model.featurizer.vocab
    batch = model.featurizer([*SENTENCES, "wonderfulness unseen"])
    assert batch["attention_mask"][-1].sum() > 0      # the unseen words still have character n-grams
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_a_regressor_teacher_gives_a_regressor_and_a_non_classifier_is_refused(tokenizer):
    teacher = make_tiny_bert(tokenizer.vocab_size, num_labels=1)
    model = distill_dan(teacher, tokenizer, SENTENCES, options=DANOptions(dim=8, hidden=8, epochs=1)).model
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    with pytest.raises(LMCompressError, match="sequence classifier"):
        distill_dan(teacher.bert, tokenizer, SENTENCES)


def test_int8_table_through_quantize_saves_smaller_and_reloads_exactly(tokenizer, tmp_path):
    from lmcompress.engine.pipeline import compress
    from lmcompress.engine.recipe import Recipe
    from lmcompress.layers import QuantizedEmbedding

    teacher, texts = teacher_and_texts(tokenizer)
    model = distill_dan(teacher, tokenizer, texts, options=DANOptions(dim=32, hidden=8, epochs=1)).model
    batch = model.featurizer(SENTENCES)
    with torch.inference_mode():
        before = model(**batch).logits
    save(model, tmp_path / "float")
    compress(model, Recipe.single("quantize", targets=["embedding"], scheme="weight_only"), progress=False,
             timing=False)
    assert isinstance(model.embedding, QuantizedEmbedding)
    save(model, tmp_path / "int8")
    assert (tmp_path / "int8" / "model.safetensors").stat().st_size < \
        0.5 * (tmp_path / "float" / "model.safetensors").stat().st_size
    loaded = load(tmp_path / "int8")
    with torch.inference_mode():
        after = model(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, after, atol=0, rtol=0)
    torch.testing.assert_close(after, before, atol=0.05, rtol=0)


def test_cli_trains_saves_and_refuses_in_one_line(tokenizer, tmp_path, capsys):
    from lmcompress.cli import main

    teacher = make_tiny_bert(tokenizer.vocab_size)
    teacher.config.id2label, teacher.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    save(teacher, tmp_path / "teacher", tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(SENTENCES)))
    (tmp_path / "extra.txt").write_text("a new film about cats\n\nthe plot is cold\n")
    common = ["distill", "--teacher", str(tmp_path / "teacher"), "--student", "dan", "--task", "sst2", "--data",
              str(data), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "dan"), "--unlabeled", str(tmp_path / "extra.txt"), "--option",
                 "ngram=1", "dim=8", "hidden=8", "epochs=1"]) == 0
    assert "12 texts + 2 unlabelled" in capsys.readouterr().out
    assert isinstance(load(tmp_path / "dan"), DAN)
    for option, word in (("no_such=1", "no_such"), ("min_count=99", "vocabulary is empty"),
                         ("subword=2", "shortest is 3")):
        assert main([*common, "--out", str(tmp_path / "bad"), "--option", option]) == 2
        err = capsys.readouterr().err.strip()
        assert word in err and "\n" not in err and not (tmp_path / "bad").exists()
    assert main([*common, "--out", str(tmp_path / "bad"), "--unlabeled", str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_augmented_copies_mask_swap_and_cut_words_the_same_way_for_teacher_and_student():
    from lmcompress.training.augment import MAX_NGRAM_WINDOW, augment_texts

    texts = [s.replace(",", " ,") for s in SENTENCES]
    masked = augment_texts(texts, copies=5, seed=1, p_mask=0.4, p_replace=0.0, p_ngram=0.0, mask_token="[MASK]")
    assert masked == augment_texts(texts, copies=5, seed=1, p_mask=0.4, p_replace=0.0, p_ngram=0.0,
                                   mask_token="[MASK]")
    assert 0 < len(masked) <= 5 * len(texts)
    for copy in masked:
        teacher_words = copy.teacher_text.split()
        # the student reads the runs of unmasked words, cut where the teacher sees the mask token
        runs = " ".join(teacher_words).split("[MASK]")
        assert list(copy.student_pieces) == [r.strip() for r in runs if r.strip()]
        assert "[MASK]" not in " ".join(copy.student_pieces)
    assert any("[MASK]" in c.teacher_text for c in masked)
    cut = augment_texts(texts, copies=4, seed=2, p_mask=0.0, p_replace=0.0, p_ngram=1.0)
    for copy in cut:
        assert copy.student_pieces == (copy.teacher_text,)
        assert 1 <= len(copy.teacher_text.split()) <= MAX_NGRAM_WINDOW
        assert any(copy.teacher_text in text for text in texts)
    swapped = augment_texts(texts, copies=3, seed=3, p_mask=0.0, p_replace=0.5, p_ngram=0.0)
    corpus = {w for t in texts for w in t.split()}
    assert swapped and all(set(c.teacher_text.split()) <= corpus for c in swapped)
    # every word masked leaves the student nothing to read: no copy
    assert augment_texts(texts, copies=2, p_mask=1.0, mask_token="[MASK]") == []


def test_augmentation_adds_teacher_labelled_copies_without_growing_the_vocabulary(tokenizer):
    teacher, texts = teacher_and_texts(tokenizer)
    plain = distill_dan(teacher, tokenizer, texts, options=DANOptions(dim=8, hidden=8, epochs=1))
    more = distill_dan(teacher, tokenizer, texts, options=DANOptions(dim=8, hidden=8, epochs=1, augment=3))
    assert plain.report["augmented"] == 0
    assert len(texts) < more.report["augmented"] <= 3 * len(texts)
    assert more.model.featurizer.vocab == plain.model.featurizer.vocab
    # copies labelled once serve several students
    options = DANOptions(dim=8, hidden=8, epochs=1, augment=3)
    labelled = label_augmented(teacher, tokenizer, texts, options)
    again = distill_dan(teacher, tokenizer, texts, options=options, augmented=labelled)
    assert again.report["augmented"] == more.report["augmented"]
    with pytest.raises(DataError, match="teacher outputs for"):
        distill_dan(teacher, tokenizer, texts, options=options, augmented=(labelled[0], labelled[1][:2]))
    with pytest.raises(ValidationError):
        DANOptions(augment_mask=1.5)


def test_word_dropout_leaves_out_features_but_never_a_whole_text():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 0, 0, 0, 0, 0]] * 200)
    dropped = drop_features(ids, 0.5)
    assert ((dropped == 0) >= (ids == 0)).all()                   # padding stays padding
    assert ((dropped == ids) | (dropped == 0)).all()               # a kept id is unchanged
    assert (dropped != 0).any(1).all()                             # every text keeps a feature
    rate = ((dropped == 0) & (ids != 0))[0::2].float().sum() / (ids[0::2] != 0).sum()
    assert 0.4 < rate < 0.6                                        # about half, less the rows it had to spare
    assert torch.equal(drop_features(ids, 0.0), ids)


def test_hint_trains_towards_the_teachers_states_and_leaves_no_extra_weights(tokenizer, tmp_path):
    teacher, texts = teacher_and_texts(tokenizer)
    logits, states = teacher_targets(teacher, tokenizer, texts, states=True)
    assert torch.equal(logits, teacher_outputs(teacher, tokenizer, texts))
    batch = tokenizer(texts[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        last = teacher(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(states[:3], (last * mask).sum(1) / mask.sum(1), atol=1e-5)
    options = DANOptions(dim=8, hidden=8, epochs=3, hint=1.0, word_dropout=0.2)
    given = distill_dan(teacher, tokenizer, texts, options=options, teacher_logits=logits, teacher_states=states)
    computed = distill_dan(teacher, tokenizer, texts, options=options)
    assert given.report["soft_losses"] == computed.report["soft_losses"]     # the same targets either way
    plain = distill_dan(teacher, tokenizer, texts, options=options.model_copy(update={"hint": 0.0}))
    assert given.report["soft_losses"][0] > plain.report["soft_losses"][0]   # the hint term is in the loss
    assert set(given.model.state_dict()) == set(plain.model.state_dict())
    save(given.model, tmp_path / "dan", given.model.featurizer)
    assert isinstance(load(tmp_path / "dan"), DAN)
    with pytest.raises(DataError, match="teacher states for"):
        distill_dan(teacher, tokenizer, texts, options=options, teacher_logits=logits, teacher_states=states[:2])
    with pytest.raises(ValidationError, match="hint and augment"):
        DANOptions(hint=1.0, augment=2)
