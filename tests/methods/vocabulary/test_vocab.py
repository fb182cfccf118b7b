"""`vocab`: vocabulary pruning of the word embedding (and a tied head) with a matching saved tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES, logits, make_tiny_bert, save_classifier, write_sentiment_csv
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import lmcompress
from lmcompress.cli import main
from lmcompress.engine.pipeline import compress, recipe_uses_data
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import DataError, RecipeError
from lmcompress.tasks import Examples

UNSEEN = "a xylophone and a zebra quietly juggled"   # words none of SENTENCES has


def unlabelled(texts):
    return Examples(list(texts), None, [None] * len(texts), None)


def kept_ids(old, new):
    """Old id -> new id, read off the two tokenizers' vocabularies."""
    new_vocab = new.get_vocab()
    return {i: new_vocab[token] for token, i in old.get_vocab().items() if token in new_vocab}


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer trained on SENTENCES (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])


def make_gpt2_lm(vocab_size):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    return GPT2LMHeadModel(config).eval()


def test_bert_same_logits_ids_remapped_and_special_tokens(tokenizer, examples):
    model = make_tiny_bert(tokenizer.vocab_size)
    before = logits(model, tokenizer)
    summary = compress(model, Recipe.single("vocab"), tokenizer, examples, progress=False)
    new = summary.tokenizer
    assert new is not None and new is not tokenizer
    torch.testing.assert_close(logits(model, new), before, rtol=0, atol=0)

    mapping = kept_ids(tokenizer, new)
    kept = sorted(mapping)
    assert [mapping[i] for i in kept] == list(range(len(kept)))        # monotone, dense 0..n-1
    assert model.bert.embeddings.word_embeddings.num_embeddings == len(kept) == model.config.vocab_size == len(new)
    assert len(kept) < 400    # 70 distinct tokens + specials + the corpus' characters (c and ##c)
    for text in SENTENCES:
        assert new(text)["input_ids"] == [mapping[i] for i in tokenizer(text)["input_ids"]]
    for name in ("cls", "sep", "pad", "unk", "mask"):
        assert getattr(new, f"{name}_token_id") == mapping[getattr(tokenizer, f"{name}_token_id")]
        assert getattr(new, f"{name}_token") == getattr(tokenizer, f"{name}_token")
    assert model.config.pad_token_id == new.pad_token_id == model.bert.embeddings.word_embeddings.padding_idx
    pair = new("the film", "was dull")
    assert pair["input_ids"] == [mapping[i] for i in tokenizer("the film", "was dull")["input_ids"]]
    assert pair["token_type_ids"] == tokenizer("the film", "was dull")["token_type_ids"]
    # unseen words: letters of the corpus are spelt out, a letter it never had makes the word [UNK]
    pieces = new.tokenize("wonderfully xylophone")
    assert pieces[0] == "wonderful" and "[UNK]" in pieces
    record = summary.layers[0]
    assert record.name == "bert.embeddings.word_embeddings" and record.replaced
    assert record.params_before == tokenizer.vocab_size * 32 and record.params_after == len(kept) * 32
    report = summary.stages[0].report
    assert report["tokens_kept"] == len(kept) and report["tokens_before"] == tokenizer.vocab_size


def test_gpt2_tied_lm_head_bpe(bpe_tokenizer, tmp_path):
    model = make_gpt2_lm(len(bpe_tokenizer))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES[:6]) + "\n\n")
    texts = SENTENCES[:6]
    before = logits(model, bpe_tokenizer, texts)
    summary = compress(model, Recipe.single("vocab", corpus=str(corpus)), bpe_tokenizer, None, progress=False)
    new = summary.tokenizer
    mapping = kept_ids(bpe_tokenizer, new)
    kept = sorted(mapping)
    assert 256 < len(kept) < len(bpe_tokenizer)        # the byte alphabet plus what the corpus needs
    assert model.lm_head.weight is model.transformer.wte.weight                   # still tied
    assert model.lm_head.out_features == len(kept) == model.config.vocab_size
    torch.testing.assert_close(logits(model, new, texts), before[..., kept], rtol=0, atol=0)
    for text in texts:
        assert new(text)["input_ids"] == [mapping[i] for i in bpe_tokenizer(text)["input_ids"]]
    spec = json.loads(new.backend_tokenizer.to_str())
    original = json.loads(bpe_tokenizer.backend_tokenizer.to_str())
    assert 0 < len(spec["model"]["merges"]) < len(original["model"]["merges"])
    # any text still tokenizes (byte alphabet kept) and decodes back
    assert new.decode(new(UNSEEN + " ☃")["input_ids"]) == UNSEEN + " ☃"
    assert new.eos_token_id == new.pad_token_id == mapping[bpe_tokenizer.eos_token_id] == model.config.eos_token_id
    assert len(summary.layers) == 1 and "tied" in summary.layers[0].note


def test_save_load_round_trip(tokenizer, examples, bpe_tokenizer, tmp_path):
    model = make_tiny_bert(tokenizer.vocab_size)
    recipe = Recipe.single("vocab")
    summary = compress(model, recipe, tokenizer, examples, progress=False)
    lmcompress.save(model, tmp_path / "bert", summary.tokenizer, recipe)
    loaded = lmcompress.load(tmp_path / "bert")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "bert")
    assert reloaded.get_vocab() == summary.tokenizer.get_vocab()
    assert reloaded(SENTENCES)["input_ids"] == summary.tokenizer(SENTENCES)["input_ids"]
    torch.testing.assert_close(logits(loaded, reloaded), logits(model, summary.tokenizer), rtol=0, atol=0)
    assert not (tmp_path / "bert" / "vocab.txt").exists()

    gpt2 = make_gpt2_lm(len(bpe_tokenizer))
    summary = compress(gpt2, recipe, bpe_tokenizer, unlabelled(SENTENCES[:4]), progress=False)
    lmcompress.save(gpt2, tmp_path / "gpt2", summary.tokenizer, recipe)
    loaded = lmcompress.load(tmp_path / "gpt2")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert reloaded(SENTENCES[:4])["input_ids"] == summary.tokenizer(SENTENCES[:4])["input_ids"]
    assert "token_type_ids" not in reloaded("x")
    torch.testing.assert_close(logits(loaded, reloaded, SENTENCES[:4]), logits(gpt2, summary.tokenizer, SENTENCES[:4]),
                               rtol=0, atol=0)


def test_oov_report(tokenizer, tmp_path):
    dev = tmp_path / "dev.txt"
    dev.write_text("the film was wonderful\nthe film was xylophone\n")
    model = make_tiny_bert(tokenizer.vocab_size)
    summary = compress(model, Recipe.single("vocab", report_data=str(dev)), tokenizer,
                       unlabelled(["the film was wonderful", "a film"]), progress=False)
    report = summary.stages[0].report["report_data"]
    outside = tokenizer.tokenize("xylophone")                        # x ##yl ##op ##hone or similar
    assert report["tokens"] == 8 + len(outside) - 1
    assert report["oov_tokens"] == len(outside) and report["oov_distinct_tokens"] == len(set(outside))
    assert report["oov_words"] == report["oov_words_unknown"] == 1 and report["oov_words_resegmented"] == 0
    assert report["examples"] == [{"word": "xylophone", "count": 1, "original": outside, "now": ["[UNK]"]}]

    # with every single-character token kept, the same word is spelt out instead
    model = make_tiny_bert(tokenizer.vocab_size)
    summary = compress(model, Recipe.single("vocab", report_data=str(dev), keep_alphabet="all"), tokenizer,
                       unlabelled(["the film was wonderful"]), progress=False)
    report = summary.stages[0].report["report_data"]
    assert report["oov_words_resegmented"] == 1 and "[UNK]" not in report["examples"][0]["now"]


def test_min_count_and_keep_tokens(tokenizer):
    texts = ["the film the film the", "dull"]
    model = make_tiny_bert(tokenizer.vocab_size)
    summary = compress(model, Recipe.single("vocab", min_count=2, keep_tokens=["zebra"], keep_alphabet="none"),
                       tokenizer, unlabelled(texts), progress=False)
    vocab = summary.tokenizer.get_vocab()
    assert {"the", "film", "zebra"} <= set(vocab) and "dull" not in vocab
    assert len(vocab) == 3 + 5 and summary.stages[0].report["below_min_count"] == 1   # + 5 special tokens
    assert summary.tokenizer.tokenize("the dull zebra") == ["the", "[UNK]", "zebra"]


def test_corpus_read_as_task_data(tokenizer, tmp_path):
    data = tmp_path / "data.csv"
    data.write_text('review,stars\n"the film was dull",1\n"wonderful acting",5\n')
    model = make_tiny_bert(tokenizer.vocab_size)
    recipe = Recipe.single("vocab", corpus=str(data), task="text-classification", text_column="review",
                           keep_alphabet="none")
    summary = compress(model, recipe, tokenizer, None, progress=False)
    assert set(summary.tokenizer.get_vocab()) == {"the", "film", "was", "dull", "wonderful", "acting",
                                                  *tokenizer.all_special_tokens}


def test_data_is_loaded_only_without_a_corpus():
    assert recipe_uses_data(Recipe.single("vocab"))
    assert not recipe_uses_data(Recipe.single("vocab", corpus="words.txt"))


def one_line(info):
    assert "\n" not in str(info.value)
    return str(info.value)


def test_errors(tokenizer, tmp_path):
    model = make_tiny_bert(tokenizer.vocab_size)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError) as info:
        compress(model, Recipe.single("vocab", corpus=str(empty)), tokenizer, None, progress=False)
    assert "has no text" in one_line(info)
    with pytest.raises(DataError, match="file not found"):
        compress(model, Recipe.single("vocab", corpus=str(tmp_path / "missing.txt")), tokenizer, None, progress=False)
    with pytest.raises(RecipeError) as info:
        compress(model, Recipe.single("vocab", keep_tokens=["notawordpiece!"]), tokenizer, unlabelled(["a"]),
                 progress=False)
    assert "not in the tokenizer's vocabulary" in one_line(info)
    with pytest.raises(RecipeError) as info:
        Recipe.single("vocab", budget={"params": 0.5})
    assert "cannot be sized by a budget" in one_line(info)
    with pytest.raises(RecipeError) as info:
        compress(model, Recipe.single("vocab", targets=["embeddings"]), tokenizer, unlabelled(["a"]), progress=False)
    assert "prunes the word embedding" in one_line(info)
    for options in ({"min_count": 0}, {"text_column": "text"}, {"task": "sst2"}, {"keep_alphabet": "some"}):
        with pytest.raises(RecipeError) as info:
            Recipe.single("vocab", **options)
        one_line(info)
    assert model.config.vocab_size == tokenizer.vocab_size        # nothing was changed by the failures


def test_unsupported_tokenizer_is_one_line(tmp_path):
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -1.5)], unk_id=0))
    unigram = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    model = make_tiny_bert(len(unigram))
    with pytest.raises(RecipeError) as info:
        compress(model, Recipe.single("vocab"), unigram, unlabelled(["ab"]), progress=False)
    assert "supports WordPiece" in one_line(info) and "Unigram" in str(info.value)


def test_cli(tokenizer, tmp_path, capsys):
    save_classifier(make_tiny_bert(tokenizer.vocab_size), tokenizer, tmp_path / "tiny")
    data = write_sentiment_csv(tmp_path / "data.csv", SENTENCES)
    dev = tmp_path / "dev.txt"
    dev.write_text("the film was xylophone\n")
    out = tmp_path / "small"
    code = main(["-q", "compress", "--model", str(tmp_path / "tiny"), "--method", "vocab", "--task",
                 "text-classification", "--data", str(data), "--text-column", "text", "--label-column", "label",
                 "--option", f"report_data={dev}", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and "compressed 1 of 1 targeted layers" in stdout
    manifest = json.loads((out / "lmcompress.json").read_text())
    report = manifest["summary"]["stages"][0]["report"]
    assert report["report_data"]["oov_words"] == 1
    loaded, reloaded = lmcompress.load(out), AutoTokenizer.from_pretrained(out)
    assert loaded.config.vocab_size == len(reloaded) == report["tokens_kept"]
    original = lmcompress.load_model(str(tmp_path / "tiny"))[0]
    torch.testing.assert_close(logits(loaded, reloaded), logits(original, tokenizer), rtol=0, atol=0)

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["-q", "compress", "--model", str(tmp_path / "tiny"), "--method", "vocab", "--option",
                 f"corpus={empty}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no text" in err


def test_cli_vocab_without_data_is_refused(tmp_path, capsys):
    from lmcompress.cli import main

    code = main(["compress", "--method", "vocab", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "give --data" in err
    assert not (tmp_path / "out").exists()
