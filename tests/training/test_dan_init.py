"""Teacher-initialised DAN tables: the vectors each mode takes from the teacher, the PCA fit, and the student's rows."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert
from pydantic import ValidationError

from lmcompress.errors import validation_message
from lmcompress.training.dan import DANOptions, distill_dan
from lmcompress.training.dan_init import INIT_STD, fit_rows, gram_text, teacher_rows, teacher_vectors

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gram_text_strips_the_pair_prefix_the_subword_mark_and_the_word_brackets():
    assert [gram_text(g) for g in ["good film", "2|good", "#<goo", "#ood>", "#<a>", "2|#<ca"]] == \
        ["good film", "good", "goo", "ood", "a", "ca"]


def test_embeddings_mode_averages_the_input_rows_of_the_word_pieces(tokenizer):
    teacher = make_tiny_bert(tokenizer.vocab_size)
    texts = ["unbelievably good", "a", "the film"]
    got = teacher_vectors(teacher, tokenizer, texts, "embeddings", batch_size=2)
    table = teacher.get_input_embeddings().weight
    for text, vector in zip(texts, got, strict=True):
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(vector, table[pieces].mean(0).detach())


def test_encoder_mode_is_the_mean_of_the_last_hidden_states_and_does_not_depend_on_padding(tokenizer):
    teacher = make_tiny_bert(tokenizer.vocab_size)
    texts = ["good", "a remarkably long and winding phrase", "bad film"]
    together = teacher_vectors(teacher, tokenizer, texts, "encoder", batch_size=3)
    alone = torch.cat([teacher_vectors(teacher, tokenizer, [t], "encoder") for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        batch = tokenizer(texts[:1], return_tensors="pt")
        direct = teacher.bert(**batch).last_hidden_state.mean(1)
    torch.testing.assert_close(together[:1], direct)


def test_pca_keeps_distances_of_vectors_in_a_subspace_and_scales_to_the_random_init():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(200, 4, generator=generator) @ torch.randn(4, 32, generator=generator) + 3.0
    rows = fit_rows(vectors, 4)
    assert rows.shape == (200, 4)
    assert rows.std().item() == pytest.approx(INIT_STD, rel=1e-4)
    ratio = torch.cdist(rows, rows)[~torch.eye(200, dtype=torch.bool)] / \
        torch.cdist(vectors, vectors)[~torch.eye(200, dtype=torch.bool)]
    assert ratio.std() / ratio.mean() < 1e-3        # one scale for every pair: nothing of the subspace is lost
    wider = fit_rows(vectors, 40)
    assert wider.shape == (200, 40) and torch.allclose(wider.mean(0)[:32], torch.zeros(32), atol=1e-6)


def test_the_student_starts_from_the_teacher_rows_and_equal_texts_get_equal_rows(tokenizer):
    teacher = make_tiny_bert(tokenizer.vocab_size, seed=1)
    texts = ["the cat sat", "a cat", "cat food is good", *SENTENCES]
    options = DANOptions(ngram=1, subword=5, dim=8, hidden=8, epochs=0, init="encoder")
    result = distill_dan(teacher, tokenizer, texts, options=options)
    table = result.model.embedding.weight.detach()
    featurizer = result.model.featurizer
    assert table[0].abs().sum() == 0 and table[1:].std().item() == pytest.approx(INIT_STD, rel=1e-3)
    # the word "cat" and its whole-word character n-gram "<cat>" are the same text to the teacher
    torch.testing.assert_close(table[featurizer.vocab["cat"]], table[featurizer.vocab["#<cat>"]])
    assert not torch.allclose(table[featurizer.vocab["cat"]], table[featurizer.vocab["the"]])
    expected, _ = teacher_rows(teacher, tokenizer, featurizer, "encoder", 8)
    torch.testing.assert_close(table, expected)
    assert result.report["init_seconds"] >= 0
    trained = distill_dan(teacher, tokenizer, texts, options=options.model_copy(update={"epochs": 1}))
    assert not torch.allclose(trained.model.embedding.weight, table)


def test_a_hashed_table_with_teacher_rows_is_refused_in_one_line():
    with pytest.raises(ValidationError) as err:
        DANOptions(hash=1000, init="embeddings")
    message = validation_message(err.value)
    assert "init=embeddings needs a kept n-gram vocabulary" in message and "\n" not in message
    with pytest.raises(ValidationError):
        DANOptions(init="glove")
