"""The sensitivity allocator's memory bounds: one unit's candidates alive at a time, statistics block by block,
the reference kept small, the KL chunked, block caches under their cap, and the same choices as a
straightforward computation that keeps everything."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert
from torch.nn import functional as F

import lmcompress.engine.allocation as allocation_module
from lmcompress.calibration.blockcache import BlockInputs
from lmcompress.calibration.collection import SequentialCalibrator, collect, encode_calibration
from lmcompress.core.families import blocks_of
from lmcompress.core.linear import set_submodule
from lmcompress.core.units import units_for
from lmcompress.engine.allocation import Candidates, SensitivityProbe, _choose, allocate, sizes_only
from lmcompress.engine.pipeline import compress, select_layers
from lmcompress.engine.recipe import Recipe
from lmcompress.methods import get_method
from lmcompress.tasks import Examples

LONG = [" ".join([s, *SENTENCES[: i + 1]]) for i, s in enumerate(SENTENCES)]   # lengths spread widely
PROBES = (0.1, 0.6)


def _llama_lm(tokenizer, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, bos_token_id=tokenizer.cls_token_id,
                                        eos_token_id=tokenizer.sep_token_id,
                                        pad_token_id=tokenizer.pad_token_id)).eval()


def _lm_batches(tokenizer, batch_size: int = 3):
    """Batches of different lengths, each with padding (short and long texts mixed)."""
    texts = [SENTENCES[0], LONG[-1], SENTENCES[2], LONG[6], SENTENCES[5], LONG[3]]
    batches = encode_calibration(tokenizer, Examples(texts, None, [None] * len(texts), None), batch_size, 64)
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    return batches


def _units_and_candidates(model, tokenizer, batches, targets=None):
    stage = Recipe.from_dict({"stages": [{"method": "whitened_svd", "budget": {"params": 0.5},
                                          **({"targets": targets} if targets else {})}]}).stages[0]
    layers = select_layers(model, stage)
    units = units_for(model, "linear", list(layers))
    method = get_method("whitened_svd")
    config = method.parse_config({})
    stats = collect(model, batches, layers, method.needs_for(config), progress=False)
    return units, [method.candidates(model, u, stats, config) for u in units]


def _straightforward_scores(model, units, candidates, batches, probes):
    """Every unit swapped in, the whole model run, every logit kept, the KL over real tokens in float64 from
    float32 reference log-probabilities (main's computation before the memory bounds)."""
    def rows(batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        mask = batch.get("attention_mask")
        return logits[mask.bool()] if logits.dim() == 3 else logits

    with torch.inference_mode():
        reference = torch.cat([F.log_softmax(rows(b), -1) for b in batches]).double()
        scores = {}
        for u, cand in enumerate(candidates):
            for p in probes:
                swapped = cand.build(cand.sizes[cand.index_for_fraction(p)])
                originals = {n: model.get_submodule(n) for n in swapped}
                for name, module in swapped.items():
                    set_submodule(model, name, module)
                output = F.log_softmax(torch.cat([rows(b) for b in batches]).double(), -1)
                for name, module in originals.items():
                    set_submodule(model, name, module)
                scores[u, p] = float((reference.exp() * (reference - output)).sum(-1).mean())
    return scores


@pytest.mark.parametrize("kind", ["llama-lm", "bert"])
def test_allocation_equals_a_straightforward_computation(kind, tokenizer):
    if kind == "bert":
        model = make_tiny_bert(tokenizer.vocab_size)
        with torch.no_grad():   # a confident classifier: a random one's outputs hardly move (divergences ~1e-14)
            model.classifier.weight.mul_(300)
        batches = encode_calibration(tokenizer, Examples(SENTENCES + LONG, None, [i % 2 for i in range(24)],
                                                         ("a", "b")), 8, 64)
    else:
        model = _llama_lm(tokenizer)
        batches = _lm_batches(tokenizer)
    # an LM's vocabulary projection makes each probe slow here: the last block's units only
    units, candidates = _units_and_candidates(model, tokenizer, batches, None if kind == "bert" else [r"layers\.1\."])
    probe = SensitivityProbe(model, blocks_of(model)[1], batches)
    try:
        assert (probe.head is not None) == (kind == "llama-lm")   # an LM keeps the head's input, not log-probs
        result = allocate(units, candidates, 0.5, probe=probe, probes=PROBES, progress=False)
    finally:
        probe.close()
    scores = _straightforward_scores(model, units, candidates, batches, PROBES)
    for unit in result.units:
        u = next(i for i, x in enumerate(units) if x.name == unit.unit)
        for p in PROBES:
            assert unit.probes[f"{p:g}"] == pytest.approx(scores[u, p], rel=1e-3, abs=1e-7)
    expected = _choose(units, [sizes_only(c) for c in candidates], 0.5, "params", 128, "sensitivity", PROBES, scores)
    assert result.sizes() == expected.sizes()
    assert result.used <= result.budget


def test_language_model_probe_keeps_only_the_head_input_and_chunks_the_kl(tokenizer, monkeypatch):
    model = _llama_lm(tokenizer)
    batches = _lm_batches(tokenizer)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    name = "model.layers.1.mlp.up_proj"
    changed = torch.nn.Linear(32, 64, bias=False)
    with torch.no_grad():
        changed.weight.copy_(model.get_submodule(name).weight * 0.3)
    probe = SensitivityProbe(model, blocks_of(model)[1], batches)
    try:
        # tokens x hidden, not tokens x vocabulary
        assert probe.reference_bytes() == tokens * 32 * 4
        assert all(r.device.type == "cpu" for r in probe.reference)
        whole = probe.score(1, {name: changed})
        monkeypatch.setattr(allocation_module, "KL_CHUNK_MB", 3 * tokenizer.vocab_size * 8 / 2**20)  # 3 rows
        assert probe.score(1, {name: changed}) == pytest.approx(whole, rel=1e-9)
        assert probe.score(0, {name: changed}) == pytest.approx(whole, rel=1e-9)   # from block 0 on: the same
    finally:
        probe.close()
    assert whole > 0


def test_a_head_whose_logits_are_transformed_keeps_log_probabilities(tokenizer):
    model = _llama_lm(tokenizer)
    forward = model.forward

    def capped(*args, **kwargs):          # soft-capping after the head, as Gemma 2 does
        out = forward(*args, **kwargs)
        out.logits = torch.tanh(out.logits / 0.01) * 0.01
        return out

    model.forward = capped
    probe = SensitivityProbe(model, blocks_of(model)[1], _lm_batches(tokenizer))
    try:
        assert probe.head is None
        assert probe.reference[0].shape[-1] == tokenizer.vocab_size
    finally:
        probe.close()


def test_only_one_units_candidates_are_alive_at_a_time(tokenizer):
    model = make_tiny_bert(tokenizer.vocab_size)
    batches = encode_calibration(tokenizer, Examples(SENTENCES, None, [i % 2 for i in range(12)], ("a", "b")), 6, 64)
    units, candidates = _units_and_candidates(model, tokenizer, batches, [r"layer\.1\."])
    alive: list[weakref.ref] = []

    class Factors:   # stands in for the decomposition a unit's builder holds
        pass

    def make(u: int) -> Candidates:
        gc.collect()
        assert sum(ref() is not None for ref in alive) == 0, "an earlier unit's candidates are still alive"
        factors = Factors()
        alive.append(weakref.ref(factors))
        base = candidates[u]

        def build(size):
            assert factors is not None
            return base.build(size)

        return Candidates(base.sizes, base.params, base.flops_per_token, build, base.dense_params,
                          base.dense_flops_per_token)

    probe = SensitivityProbe(model, blocks_of(model)[1], batches)
    try:
        result = allocate(units, make, 0.5, probe=probe, probes=(0.3,), progress=False)
    finally:
        probe.close()
    gc.collect()
    assert len(alive) == len(units) and all(ref() is None for ref in alive)
    same = allocate(units, candidates, 0.5, probe=None, strategy="uniform", progress=False)
    assert result.dense == same.dense and len(result.units) == len(units)


def test_budget_decomposes_each_unit_from_its_own_blocks_statistics(tokenizer, monkeypatch):
    model = _llama_lm(tokenizer, layers=3)
    method = get_method("whitened_svd")
    seen = []
    original = type(method).candidates

    def recording(self, model_, unit, stats, config):
        seen.append((unit.block, sorted(stats)))
        return original(self, model_, unit, stats, config)

    monkeypatch.setattr(type(method), "candidates", recording)
    texts = SENTENCES[:4] + LONG[-4:]
    data = Examples(texts, None, [None] * len(texts), None)
    recipe = Recipe.from_dict({"stages": [{"method": "whitened_svd", "budget": {"params": 0.5},
                                           "targets": [r"mlp\.(up|down)_proj$"],
                                           "allocation": {"samples": 4, "probes": [0.3]}}],
                               "calibration": {"batch_size": 4, "max_length": 32, "mode": "one_shot"}})
    summary = compress(model, recipe, tokenizer, data, progress=False, timing=False)
    assert summary.params_after <= 0.5 * summary.params_before
    assert {block for block, _ in seen} == {0, 1, 2}
    for block, names in seen:   # only the unit's own block's layers were calibrated when it was decomposed
        assert names and all(n.startswith(f"model.layers.{block}.") for n in names), names


def test_probe_block_caches_share_the_cap_and_scores_do_not_change(tokenizer):
    model = _llama_lm(tokenizer, layers=3)
    batches = _lm_batches(tokenizer)
    name = "model.layers.2.self_attn.o_proj"
    changed = torch.nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        changed.weight.copy_(model.get_submodule(name).weight * 0.5)
    scores = []
    for cap_mb in (1024.0, 0.01):
        probe = SensitivityProbe(model, blocks_of(model)[1], batches, cache_mb=cap_mb)
        try:
            assert sum(c.in_memory_bytes for c in probe.inputs) <= cap_mb * 2**20
            assert all(isinstance(c.hidden(0), torch.Tensor) and c.hidden(0).device.type == "cpu"
                       for c in probe.inputs)
            scores.append(probe.score(2, {name: changed}))
        finally:
            probe.close()
    assert scores[0] > 0 and scores[1] == pytest.approx(scores[0], rel=1e-9)


@pytest.mark.parametrize("teacher", [False, True])
def test_calibrator_caches_together_stay_under_the_cap_on_the_host(tokenizer, monkeypatch, teacher):
    model = _llama_lm(tokenizer, layers=3)
    batches = _lm_batches(tokenizer)
    live: weakref.WeakSet = weakref.WeakSet()
    peak = [0]
    append = BlockInputs.append

    def watched(self, hidden, *args):
        live.add(self)
        append(self, hidden, *args)
        assert all(h.device.type == "cpu" for h in self._hidden if torch.is_tensor(h))
        peak[0] = max(peak[0], sum(c.in_memory_bytes for c in live))

    monkeypatch.setattr(BlockInputs, "append", watched)
    one_batch = 64 * 32 * 4 * 3      # at most a batch of 3 x 64 tokens x 32 floats
    cap_mb = 2.5 * one_batch / 2**20
    calibrator = SequentialCalibrator(model, blocks_of(model)[1], batches, teacher=teacher, cache_mb=cap_mb,
                                      progress=False)
    try:
        for block in range(3):
            calibrator.begin_block(block)
            calibrator.run_ahead()
    finally:
        calibrator.close()
    assert 0 < peak[0] <= cap_mb * 2**20
