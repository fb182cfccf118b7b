"""`lmcompress anatomy`: counts on the meta device equal real models', shipped configs match published sizes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lmcompress.cli import main
from lmcompress.core.configs import PUBLISHED, read_config_dict, shipped_names
from lmcompress.evaluation.anatomy import PARTS, anatomy, build_on_meta, measure
from lmcompress.evaluation.efficiency import count_flops

TINY = {
    "bert": {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 48, "max_position_embeddings": 64},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 100, "n_embd": 32, "n_layer": 2,
             "n_head": 4, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0},
    "llama": {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64},
    "t5": {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 100, "d_model": 32,
           "d_ff": 48, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 3},
}


def real_model(data: dict) -> torch.nn.Module:
    """The same config instantiated for real, on the CPU, with ordinary initialised weights."""
    config = transformers.AutoConfig.for_model(**{k: v for k, v in data.items() if k != "architectures"})
    if "architectures" in data:
        return getattr(transformers, data["architectures"][0])(config).eval()
    return transformers.AutoModel.from_config(config).eval()


@pytest.mark.parametrize("kind", sorted(TINY))
def test_totals_equal_real_models(kind):
    result = measure(build_on_meta(TINY[kind]), seq_len=16)
    assert result.params["total"] == sum(p.numel() for p in real_model(TINY[kind]).parameters())
    assert result.params["total"] == sum(result.params[part] for part in PARTS)
    assert all(result.params[part] > 0 for part in ("embeddings", "attention", "feed_forward", "norms"))
    assert sum(b.total for b in result.blocks) == (result.params["attention"] + result.params["feed_forward"]
                                                    + sum(b.norms for b in result.blocks))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_flops_equal_pytorchs_counter(kind):
    """The analytic count equals what PyTorch's FLOP counter measures on a forward pass of the real model."""
    data = {k: v for k, v in TINY[kind].items() if k != "architectures"}
    assert measure(build_on_meta(data), seq_len=16).flops == count_flops(real_model(data), 16)


def test_gpt2_flops_equal_pytorchs_counter():
    data = {k: v for k, v in TINY["gpt2"].items() if k != "architectures"}  # the base model: no LM head
    assert measure(build_on_meta(data), seq_len=16).flops == count_flops(real_model(data), 16)


def test_encoder_decoder_blocks_and_cross_attention():
    result = measure(build_on_meta(TINY["t5"]), seq_len=8)
    stacks = [b.stack for b in result.blocks]
    assert stacks == ["encoder.block"] * 2 + ["decoder.block"] * 3
    encoder, decoder = result.blocks[1], result.blocks[3]  # not block 0: it also holds the relative position bias
    assert decoder.attention == 2 * encoder.attention  # self-attention plus cross-attention
    assert decoder.feed_forward == encoder.feed_forward
    assert result.params["embeddings"] == 100 * 32  # shared input embeddings and LM head, counted once


def test_untied_output_embeddings_are_counted():
    """Recent transformers ties T5/mT5 output embeddings whatever the config says; the config is what counts."""
    tied = measure(build_on_meta(TINY["t5"])).params
    untied = measure(build_on_meta({**TINY["t5"], "tie_word_embeddings": False})).params
    assert untied["total"] - tied["total"] == untied["embeddings"] - tied["embeddings"] == 100 * 32


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_match_published_counts(name):
    published = PUBLISHED[name]
    total = anatomy(name).params["total"]
    assert abs(total - published.params) <= published.tolerance * published.params, (name, total)


def test_every_shipped_config_has_a_published_count():
    assert shipped_names() == sorted(PUBLISHED)


def test_shipped_minilm_is_the_bundled_model():
    """The shipped all-MiniLM-L6-v2 config counts exactly the tensors of the bundled checkpoint."""
    from safetensors import safe_open

    from lmcompress.io.models import bundled_model_path

    path = bundled_model_path()
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        held = sum(torch.Size(weights.get_slice(k).get_shape()).numel() for k in weights.keys()  # noqa: SIM118
                   if not k.endswith("position_ids"))
    assert anatomy("all-MiniLM-L6-v2").params["total"] == held
    assert anatomy(str(path)).params == anatomy("all-MiniLM-L6-v2").params  # a model directory, read the same way


def run(argv, capsys):
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "anatomy.json"
    code, stdout, _ = run(["anatomy", "bert-base-uncased", "--seq-len", "64", "--json", str(out)], capsys)
    assert code == 0
    assert "feed_forward" in stdout and "bert.encoder.layer.0-11" in stdout and "109,514,298" in stdout
    result = json.loads(out.read_text())
    assert set(result) >= {"params", "flops", "seq_len", "model_type", "blocks"}
    assert set(result["params"]) >= {"total", "embeddings", "attention", "feed_forward", "other"}  # evaluate's keys
    assert result["params"]["total"] == sum(v for k, v in result["params"].items() if k != "total")
    assert result["seq_len"] == 64 and result["model_type"] == "bert" and result["flops"] > 0
    assert len(result["blocks"]) == 12
    assert set(result["blocks"][0]) >= {"index", "attention", "feed_forward", "norms", "total"}
    assert [b["index"] for b in result["blocks"]] == list(range(12))


def test_cli_reads_a_config_file_and_a_model_directory(tmp_path, capsys):
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(TINY["t5"]))
    code, stdout, _ = run(["anatomy", str(config_file)], capsys)
    assert code == 0 and "decoder.block" in stdout
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY["llama"]))
    code, stdout, _ = run(["anatomy", str(tmp_path / "model")], capsys)
    assert code == 0 and "LlamaModel" in stdout


@pytest.mark.parametrize("contents, message", [
    (None, "no such model directory, config file or shipped config"),
    ("dir", "has no config.json"),
    ("not json {", "is not a JSON config"),
    ('{"hidden_size": 32}', 'is not a model config (it has no "model_type")'),
    ('["bert"]', 'is not a model config'),
    ('{"model_type": "frobnicator"}', "unknown model type 'frobnicator'"),
    ('{"model_type": "bert", "hidden_size": "big"}', "not a valid bert config"),
    ('{"model_type": "bert", "hidden_size": 30, "num_attention_heads": 4}', "cannot build a bert model"),
])
def test_bad_input_is_one_line(tmp_path, capsys, contents, message):
    path = tmp_path / "config.json"
    if contents == "dir":
        path = tmp_path / "empty"
        path.mkdir()
    elif contents is not None:
        path.write_text(contents)
    code, stdout, stderr = run(["anatomy", str(path)], capsys)
    assert code == 2 and stdout == ""
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_bad_seq_len_is_one_line(capsys):
    code, _, stderr = run(["anatomy", "t5-small", "--seq-len", "0"], capsys)
    assert code == 2 and "--seq-len must be at least 1" in stderr


def test_a_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    (tmp_path / "t5-small").mkdir()
    (tmp_path / "t5-small" / "config.json").write_text(json.dumps(TINY["bert"]))
    monkeypatch.chdir(tmp_path)
    assert read_config_dict("t5-small")[0]["model_type"] == "bert"
