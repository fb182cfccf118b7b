"""Sequential onloading (`--offload`), sharded saving and lazy loading, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES, logits, make_tiny_bert, make_tiny_llama, save_classifier, write_sentiment_csv

from lmcompress.core.placement import offloader_of
from lmcompress.engine.recipe import Recipe
from lmcompress.entrypoints.arguments import DataArgs, OutputArgs
from lmcompress.entrypoints.compress import CompressArgs, run_compress
from lmcompress.errors import LMCompressError, ModelLoadError
from lmcompress.io import saving
from lmcompress.io.checkpoint import INDEX_NAME
from lmcompress.io.models import load_model
from lmcompress.io.offload import offloaded
from lmcompress.io.shards import write_shards

pytestmark = pytest.mark.usefixtures("one_thread")
MAKERS = {"bert": lambda tok: make_tiny_bert(tok.vocab_size),
          "llama": lambda tok: make_tiny_llama(tok.vocab_size, tok.pad_token_id)}


@pytest.fixture(params=sorted(MAKERS))
def saved(request, tokenizer, tmp_path):
    model = MAKERS[request.param](tokenizer)
    return model, save_classifier(model, tokenizer, tmp_path / "hf")


def test_offloaded_model_runs_like_the_loaded_one_and_holds_no_block_between_passes(saved, tokenizer):
    model, folder = saved
    lazy, offloader = offloaded(type(model), model.config, folder, torch.device("cpu"), "disk")
    assert torch.equal(logits(lazy, tokenizer), logits(model, tokenizer))
    assert offloader.loads == len(offloader.blocks)
    block_tensors = [t for block in offloader.blocks for t in block.state_dict().values()]
    assert block_tensors and all(t.device.type == "meta" for t in block_tensors)


def test_host_offloading_moves_blocks_and_keeps_outputs(saved, tokenizer):
    model, folder = saved   # on a CPU the host is the device; the moves still run
    lazy, offloader = offloaded(type(model), model.config, folder, torch.device("cpu"), "cpu")
    assert torch.equal(logits(lazy, tokenizer), logits(model, tokenizer))
    assert offloader.loads == len(offloader.blocks) and not offloader.resident


def test_sharded_save_and_lazy_load_are_exact(saved, tokenizer, tmp_path):
    model, _ = saved
    out = tmp_path / "sharded"
    out.mkdir()
    model.config.save_pretrained(out)
    write_shards(model, out)
    (out / saving.MANIFEST_NAME).write_text(json.dumps({"format": "lmcompress", "format_version": 1,
                                                        "architecture": type(model).__name__, "replaced": {}}))
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == model.config.num_hidden_layers + 1
    for offload in ("none", "disk"):
        back = saving.load(out, offload=offload)
        assert torch.equal(logits(back, tokenizer), logits(model, tokenizer)), offload


def _compress(folder, tmp_path, offload: str, mode: str = "sequential", stage: dict | None = None):
    data = write_sentiment_csv(tmp_path / "cal.csv", SENTENCES * 2)
    recipe = Recipe.model_validate({"calibration": {"samples": 16, "batch_size": 4, "mode": mode},
                                    "stages": [stage or {"method": "whitened_svd", "options": {"keep": 0.5}}]})
    out = tmp_path / f"out-{offload}-{mode}-{len(list(tmp_path.iterdir()))}"
    run_compress(CompressArgs(recipe, OutputArgs(str(out)), str(folder), DataArgs(data=str(data)), timing=False,
                              progress=False, offload=offload))
    return out


STAGES = {
    "whitened_svd": {"method": "whitened_svd", "options": {"keep": 0.5}},
    "prune kcm": {"method": "prune", "options": {"score": "kcm"}, "budget": {"flops": 0.6}},
    "prune magnitude": {"method": "prune", "options": {"score": "magnitude", "compensate": "none"},
                        "budget": {"params": 0.6}},
    "int4 rtn": {"method": "quantize", "options": {"bits": 4, "scheme": "weight_only"}},
}


@pytest.mark.parametrize(("stage", "mode"), [("whitened_svd", "sequential"), ("whitened_svd", "one_shot"),
                                             ("prune kcm", "sequential"), ("prune magnitude", "sequential"),
                                             ("int4 rtn", "sequential")])
def test_compressing_with_blocks_on_disk_gives_the_same_model(saved, tokenizer, tmp_path, stage, mode):
    _, folder = saved
    whole = load_model(_compress(folder, tmp_path, "none", mode, STAGES[stage]))[0]
    path = _compress(folder, tmp_path, "disk", mode, STAGES[stage])
    assert (path / INDEX_NAME).is_file()   # written block by block
    assert torch.allclose(logits(load_model(path)[0], tokenizer), logits(whole, tokenizer), atol=1e-5)


def test_offload_refuses_what_needs_the_whole_model(saved, tmp_path):
    _, folder = saved
    with pytest.raises(LMCompressError, match="wait on disk"):
        _compress(folder, tmp_path, "disk", stage={"method": "whitened_svd", "budget": {"params": 0.5}})
    with pytest.raises(ModelLoadError, match="unknown offload"):
        load_model(str(folder), offload="ram")


def test_loading_with_offload_keeps_the_offloader_until_closed(saved):
    _, folder = saved
    model, _ = load_model(str(folder), offload="disk")
    offloader = offloader_of(model)
    assert offloader is not None
    offloader.close()
    assert not any(block._forward_pre_hooks for block in offloader.blocks)
