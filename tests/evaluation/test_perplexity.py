"""The language-modeling task: sliding-window perplexity, pseudo-perplexity, plain-text data, model loading, CLI."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from conftest import SHARED_DATA, TEXT, make_tiny_gpt2, save_classifier, tiny_gpt2_lm

import lmcompress.evaluation.perplexity as ppl_module
from lmcompress.cli import main
from lmcompress.errors import DataError, LMCompressError, ModelLoadError
from lmcompress.evaluation.perplexity import perplexity, pseudo_perplexity, sliding_windows
from lmcompress.io.models import load_model
from lmcompress.tasks import get_task, load_examples
from lmcompress.tasks.text import token_chunks


def tiny_llama_lm(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def tiny_bert_mlm(tokenizer, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return BertForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def gpt2_lm(tokenizer):
    return tiny_gpt2_lm(tokenizer)


def hand_nll(model, ids: list[int]) -> list[float]:
    """-log p(token i | tokens < i) for i >= 1, from one forward pass over all of `ids`."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return [-float(log_probs[i - 1, ids[i]]) for i in range(1, len(ids))]


# --- causal perplexity ------------------------------------------------------------------------------------


def test_perplexity_matches_hand_computation(gpt2_lm, tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    assert 40 < len(ids) <= 128  # one window
    nll = hand_nll(gpt2_lm, ids)
    score = perplexity(gpt2_lm, tokenizer, TEXT, max_length=128)
    assert score.tokens == len(ids) - 1 and score.text_tokens == len(ids) and score.rows == 1
    assert score.nll == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_stride_scores_every_token_exactly_once(gpt2_lm, tokenizer, monkeypatch):
    n = len(tokenizer(TEXT)["input_ids"])
    scored: Counter[int] = Counter()
    original = ppl_module._window_nll

    def counting(logits, ids, window):
        scored.update(range(window.first, window.end))
        return original(logits, ids, window)

    monkeypatch.setattr(ppl_module, "_window_nll", counting)
    inputs: list[int] = []
    hook = gpt2_lm.register_forward_hook(lambda _m, args, kwargs, _out: inputs.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        score = perplexity(gpt2_lm, tokenizer, TEXT, max_length=16, stride=5, batch_size=3)
    finally:
        hook.remove()
    assert set(scored) == set(range(1, n)) and set(scored.values()) == {1}  # token 0 never, the rest once
    assert score.tokens == n - 1 and sum(inputs) == score.rows > (n - 16) // 5  # overlapping windows, batched
    assert max(inputs) <= 3

    # A text that fits in one window scores the same whatever the stride.
    short = "the film was wonderful and the acting superb"
    whole = perplexity(gpt2_lm, tokenizer, short, max_length=64, stride=64)
    for stride in (1, 7, 32):
        assert perplexity(gpt2_lm, tokenizer, short, max_length=64, stride=stride).perplexity == pytest.approx(
            whole.perplexity, rel=1e-6)


def test_sliding_window_layout():
    windows = sliding_windows(10, 4, 2)
    assert [(w.begin, w.end, w.first) for w in windows] == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    # stride = max_length: disjoint windows, whose first tokens have no context in their window
    disjoint = sliding_windows(10, 4, 4)
    assert [(w.begin, w.end, w.first) for w in disjoint] == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    for n, length, stride in [(2, 2, 1), (50, 8, 3), (100, 16, 15), (17, 16, 8)]:
        covered = [p for w in sliding_windows(n, length, stride) for p in range(w.first, w.end)]
        assert covered == list(range(1, n))
        assert all(w.end - w.begin <= length and w.begin < w.first for w in sliding_windows(n, length, stride))


def test_long_windows_give_more_context(gpt2_lm, tokenizer):
    """Each token is still scored once; only the context it is predicted from changes with the stride."""
    n = len(tokenizer(TEXT)["input_ids"])
    scores = [perplexity(gpt2_lm, tokenizer, TEXT, max_length=16, stride=s) for s in (4, 16)]
    assert scores[0].tokens == n - 1 and scores[0].rows > scores[1].rows
    assert scores[1].tokens == n - 1 - (scores[1].rows - 1)  # disjoint windows skip their first token


def test_perplexity_errors(gpt2_lm, tokenizer):
    with pytest.raises(DataError, match="at least 2"):
        perplexity(gpt2_lm, tokenizer, "film", add_special_tokens=False)
    with pytest.raises(DataError, match="at least 2"):
        perplexity(gpt2_lm, tokenizer, "", add_special_tokens=False)
    with pytest.raises(DataError, match="1 token"):
        perplexity(gpt2_lm, tokenizer, TEXT, max_tokens=1)
    for stride in (0, -3, 33):
        with pytest.raises(LMCompressError, match="stride must be between 1 and max_length"):
            perplexity(gpt2_lm, tokenizer, TEXT, max_length=32, stride=stride)
    with pytest.raises(LMCompressError, match="max_length must be at least 2"):
        perplexity(gpt2_lm, tokenizer, TEXT, max_length=1, stride=1)
    with pytest.raises(LMCompressError, match="longer than the model's 128 positions"):
        perplexity(gpt2_lm, tokenizer, TEXT, max_length=256)


# --- masked LM pseudo-perplexity --------------------------------------------------------------------------


def test_pseudo_perplexity_matches_hand_computation(tokenizer):
    model = tiny_bert_mlm(tokenizer)
    text = "the film was very good"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 7  # [CLS] + 5 tokens + [SEP]
    nll = []
    with torch.no_grad():
        for i in range(1, 6):
            masked = list(ids)
            masked[i] = tokenizer.mask_token_id
            log_probs = torch.log_softmax(model(torch.tensor([masked])).logits[0, i].double(), dim=-1)
            nll.append(-float(log_probs[ids[i]]))
    score = pseudo_perplexity(model, tokenizer, text, batch_size=2)
    assert score.method == "pseudo_perplexity" and score.tokens == 5 and score.rows == 5
    assert score.perplexity == pytest.approx(math.exp(sum(nll) / 5), rel=1e-5)
    assert pseudo_perplexity(model, tokenizer, text, max_tokens=2).tokens == 2
    chunked = pseudo_perplexity(model, tokenizer, TEXT, max_length=10, batch_size=16)  # 8 text tokens a chunk
    assert chunked.tokens == len(tokenizer(TEXT, add_special_tokens=False)["input_ids"])


# --- data and model loading -------------------------------------------------------------------------------


def test_language_modeling_task_reads_plain_text(tmp_path, tokenizer):
    task = get_task("lm")
    assert task.name == "language-modeling" and task.metric == "perplexity" and get_task("Language_Modeling") == task
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("first line\n\n   \n second line \nthird\n")
    examples = load_examples(task, text_file, "dev")
    assert examples.texts == ["first line", " second line ", "third"] and examples.labels == [None] * 3
    assert load_examples(task, text_file, "train", max_samples=2).texts == ["first line", " second line "]
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "wiki.valid.tokens").write_text("valid tokens\n")
    (folder / "wiki.valid.raw").write_text("valid raw\n")
    (folder / "wiki.test.raw").write_text("test raw\n")
    assert load_examples(task, folder, "train").texts == ["valid raw"]
    assert load_examples(task, folder, "dev").texts == load_examples(task, folder, "test").texts == ["test raw"]
    with pytest.raises(DataError, match="unknown split"):
        load_examples(task, folder, "validation")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no text"):
        load_examples(task, tmp_path / "empty.txt", "dev")
    with pytest.raises(DataError, match="no file for split 'dev'"):
        load_examples(task, tmp_path, "dev")
    chunks = token_chunks(tokenizer, load_examples(task, text_file, "dev"), 4)
    assert all(len(tokenizer(t)["input_ids"]) <= 5 for t in chunks.texts) and len(chunks) >= 2


def test_load_model_picks_the_language_model_class(tmp_path, tokenizer):
    lm_dir = tmp_path / "lm"
    tiny_gpt2_lm(tokenizer).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    model, _ = load_model(lm_dir, language_model=True)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert type(load_model(lm_dir, num_labels=2)[0]).__name__ == "GPT2ForSequenceClassification"  # unchanged
    classifier = save_classifier(make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id), tokenizer,
                                 tmp_path / "cls")
    with pytest.raises(ModelLoadError, match="not a language model"):
        load_model(classifier, language_model=True)


# --- command line -----------------------------------------------------------------------------------------


def run(argv, capsys):
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def lm_files(tmp_path, tokenizer):
    model_dir = tmp_path / "gpt2-lm"
    tiny_gpt2_lm(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "text.raw"
    data.write_text("\n".join([TEXT] * 4) + "\n")
    return model_dir, data


def test_cli_evaluate_and_compress_a_causal_lm(lm_files, tmp_path, capsys):
    model_dir, data = lm_files
    result_file = tmp_path / "eval.json"
    common = ["--task", "language-modeling", "--data", str(data)]
    code, out, err = run(["evaluate", "--model", str(model_dir), *common, "--max-length", "32", "--repeats", "1",
                          "--seq-len", "16", "--json", str(result_file)], capsys)
    assert code == 0, err
    result = json.loads(result_file.read_text())
    lm = result["language_modeling"]
    assert result["metric"] == {"name": "perplexity", "value": lm["perplexity"], "lower_is_better": True}
    assert lm["tokens"] == lm["text_tokens"] - 1 and lm["stride"] == 16 and lm["max_length"] == 32
    assert result["flops"] > 0 and result["latency_ms"] > 0 and result["params"]["total"] > 0
    assert "perplexity" in out and "lower is better" in out and f"{lm['tokens']:,} tokens scored" in out

    out_dir = tmp_path / "svd"
    code, out, err = run(["compress", "--model", str(model_dir), *common, "--method", "whitened_svd", "--keep", "0.5",
                          "--calib-samples", "4", "--calib-max-length", "32", "--no-timing", "--out", str(out_dir)],
                         capsys)
    assert code == 0, err
    assert "compressed 8 of 8 targeted layers" in out
    code, out, err = run(["evaluate", "--model", str(out_dir), "--task", "lm", "--data", str(data), "--max-length",
                          "32", "--stride", "8", "--max-tokens", "40", "--repeats", "1", "--seq-len", "8"], capsys)
    assert code == 0, err
    assert "on 39 tokens scored of 40" in out

    code, _, err = run(["evaluate", "--model", str(model_dir), *common, "--max-length", "32", "--stride", "40"],
                       capsys)
    assert code == 2 and err.count("\n") == 1 and "stride" in err


def test_cli_compress_a_llama_lm(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "llama-lm"
    tiny_llama_lm(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "text.txt"
    data.write_text(TEXT + "\n")
    code, out, err = run(["compress", "--model", str(model_dir), "--task", "lm", "--data", str(data), "--method",
                          "quantize", "--no-timing", "--out", str(tmp_path / "q")], capsys)
    assert code == 0, err
    model, _ = load_model(tmp_path / "q", language_model=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert perplexity(model, tokenizer, TEXT, max_length=32).tokens == len(tokenizer(TEXT)["input_ids"]) - 1


def test_cli_lm_eval_without_the_harness(lm_files, capsys):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("lm-eval is installed here")
    model_dir, _ = lm_files
    code, out, err = run(["evaluate", "--lm-eval", "hellaswag", "--model", str(model_dir)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "lm-evaluation-harness" in err


def test_cli_finetune_refuses_language_modeling(lm_files, tmp_path, capsys):
    _, data = lm_files
    code, _, err = run(["finetune", "--task", "lm", "--data", str(data), "--out", str(tmp_path / "f")], capsys)
    assert code == 2 and "no labels" in err


# --- real data --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED_DATA / "lm" / "wikitext-2-raw").is_dir(), reason="../shared/data/lm not present")
def test_wikitext_perplexity_on_the_first_tokens(gpt2_lm, tokenizer):
    task = get_task("language-modeling")
    folder = SHARED_DATA / "lm" / "wikitext-2-raw"
    test = load_examples(task, folder, "test", max_samples=20)
    assert test.texts[0].strip() == "= Robert Boulter ="
    assert load_examples(task, folder, "train", max_samples=1).texts[0].strip() == "= Homarus gammarus ="
    score = perplexity(gpt2_lm, tokenizer, "\n".join(test.texts), max_length=64, stride=32, max_tokens=300)
    assert score.tokens == 299 and math.isfinite(score.perplexity) and score.perplexity > 1
    tokens_file = SHARED_DATA / "lm" / "wikitext-2" / "wiki.test.tokens"
    if tokens_file.is_file():
        assert "<unk>" in "\n".join(load_examples(task, tokens_file, "dev", max_samples=200).texts)


def test_int8_dynamic_baseline_quantizes_gpt2_conv1d_blocks(gpt2_lm, tokenizer):
    """Regression: PyTorch's quantize_dynamic only knows nn.Linear, so on GPT-2 the 'int8' baseline used to
    quantize the output head alone and leave every Conv1D of the decoder blocks in fp32."""
    from lmcompress.core.linear import Conv1D
    from lmcompress.evaluation import int8_dynamic

    quantized = int8_dynamic(gpt2_lm)
    assert not any(isinstance(m, Conv1D) for m in quantized.modules())
    block = quantized.transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert type(layer).__name__ == "Linear" and hasattr(layer, "_packed_params")  # dynamic int8
    assert any(isinstance(m, Conv1D) for m in gpt2_lm.modules())  # the original is left alone
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :32]
    with torch.inference_mode():
        dense, int8 = gpt2_lm(input_ids=ids).logits, quantized(input_ids=ids).logits
    assert torch.allclose(dense, int8, atol=0.05 * float(dense.abs().max()))
    assert perplexity(quantized, tokenizer, TEXT, max_length=16).perplexity == pytest.approx(
        perplexity(gpt2_lm, tokenizer, TEXT, max_length=16).perplexity, rel=0.02)
