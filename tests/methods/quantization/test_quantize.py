"""quantize: bit packing, integer grids, GPTQ, the quantized layers, stacked recipes saved and loaded exactly,
embeddings, one-line errors for bad options, and FLOP / parameter accounting of quantized models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES, logits, make_tiny_bert, make_tiny_gpt2, stats_of
from torch import nn

import lmcompress
import lmcompress.methods.quantization.quantize  # noqa: F401  (registers the method even where the registry does not list it)
import lmcompress.methods.sparsity.sparsify  # noqa: F401
from lmcompress.cli import main
from lmcompress.core.families import parameters_by_component
from lmcompress.core.int8_activations import full_range_safe
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import CalibrationError, RecipeError
from lmcompress.evaluation.efficiency import count_flops
from lmcompress.io.saving import MANIFEST_NAME, WEIGHTS_NAME, compressed_modules
from lmcompress.kernels.obs import obs_pass
from lmcompress.kernels.quantgrid import GridSpec, dequantize, grid_params, quantize_codes
from lmcompress.layers import LowRankLinear, QuantizedEmbedding, QuantizedLinear, SparseLinear, layer_from_manifest
from lmcompress.layers.packing import pack_mask, pack_nibbles, unpack_mask, unpack_nibbles
from lmcompress.methods import get_method

CALIBRATION = {"samples": 12, "batch_size": 4}


def low_rank_inputs(n: int, dim: int, rank: int = 6, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Activations with most of their energy in a few directions, plus a little isotropic noise (float64)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=generator, dtype=torch.float64)
    x = torch.randn(n, rank, generator=generator, dtype=torch.float64) @ basis
    return x + noise * torch.randn(n, dim, generator=generator, dtype=torch.float64)


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    x, weight, approx = x.double(), weight.detach().double(), approx.detach().double()
    return float((x @ (weight - approx).T).norm() / (x @ weight.T).norm())


def expand(per_group: torch.Tensor, width: int) -> torch.Tensor:
    return per_group.repeat_interleave(width // per_group.shape[1], dim=1)


# --- packing ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 7, 8, 33])
def test_nibble_pack_round_trip(count):
    codes = torch.randint(-8, 8, (count,), generator=torch.Generator().manual_seed(count), dtype=torch.int8)
    codes[0] = -8                       # both ends of the range
    codes[-1] = 7
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count / 2)
    assert torch.equal(unpack_nibbles(packed, count), codes)
    # any shape goes in, flat codes come out in row-major order
    grid = torch.arange(-8, 7, dtype=torch.int8).reshape(3, 5)
    assert torch.equal(unpack_nibbles(pack_nibbles(grid), 15).reshape(3, 5), grid)


def test_nibble_layout_is_low_nibble_first():
    assert pack_nibbles(torch.tensor([-8, 7], dtype=torch.int8)).tolist() == [0xF0]
    assert pack_nibbles(torch.tensor([0, -8, 1], dtype=torch.int8)).tolist() == [0x08, 0x09]


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (4, 16), (5, 13)])
def test_mask_pack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(math.prod(shape))) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(math.prod(shape) / 8)
    assert torch.equal(unpack_mask(packed, shape), mask)
    assert torch.equal(unpack_mask(pack_mask(torch.ones(shape, dtype=torch.bool)), shape), torch.ones(shape).bool())
    assert not unpack_mask(pack_mask(torch.zeros(shape, dtype=torch.bool)), shape).any()


def test_mask_layout_is_bit_i_of_byte_j():
    mask = torch.zeros(10, dtype=torch.bool)
    mask[0] = mask[9] = True
    assert pack_mask(mask).tolist() == [1, 2]


# --- integer grids ------------------------------------------------------------------------------------------

def awkward_weight(out: int = 12, width: int = 64) -> torch.Tensor:
    weight = torch.randn(out, width, generator=torch.Generator().manual_seed(5))
    weight[0] = weight[0].abs() + 0.5        # all positive: an asymmetric grid must still reach 0
    weight[1] = -weight[1].abs() - 0.5       # all negative
    weight[2] = 0                            # an all-zero row
    weight[3, 5:40] = 0                      # exact zeros inside a row, across groups
    weight[4] *= 100                         # a row on another scale
    return weight


GRIDS = [GridSpec(8, None, True), GridSpec(8, None, False), GridSpec(8, 16, True), GridSpec(4, None, True),
         GridSpec(4, None, False), GridSpec(4, 16, True), GridSpec(4, 16, False), GridSpec(4, 8, False)]


@pytest.mark.parametrize("spec", GRIDS, ids=str)
def test_round_trip_error_is_at_most_half_a_step(spec):
    weight = awkward_weight()
    layer = QuantizedLinear.from_weight(weight, torch.randn(12), spec, "weight_only")
    restored = layer.dense_weight()
    steps = expand(layer.scales, weight.shape[1])
    assert layer.scales.shape == (12, spec.groups(64))
    assert ((weight - restored).abs() <= steps / 2 + 1e-5 * steps).all()
    assert torch.equal(restored[weight == 0], torch.zeros(int((weight == 0).sum())))  # zero is on every grid
    codes = layer.full_codes()
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    if spec.bits == 4:
        assert layer.codes.dtype == torch.uint8 and layer.codes.numel() == weight.numel() // 2
    else:
        assert layer.codes.dtype == torch.int8 and layer.codes.numel() == weight.numel()
    assert (layer.zeros is None) == spec.symmetric
    # the stand-alone functions agree with the layer
    scales, zeros = grid_params(weight, spec)
    assert torch.equal(dequantize(quantize_codes(weight, scales, zeros, spec), scales, zeros), restored)


def test_grids_use_their_whole_range():
    weight = awkward_weight()
    for spec in (GridSpec(4, None, True), GridSpec(4, None, False)):
        codes = QuantizedLinear.from_weight(weight, None, spec, "weight_only").full_codes()[5]
        if spec.symmetric:   # the largest magnitude of a row lands on +-qmax
            assert int(codes.abs().max()) == spec.qmax
        else:                # a row with both signs spans qmin..qmax
            assert int(codes.min()) == spec.qmin and int(codes.max()) == spec.qmax


# --- GPTQ ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [GridSpec(4, None, True), GridSpec(4, None, False), GridSpec(4, 32, True),
                                  GridSpec(4, 32, False)], ids=str)
def test_gptq_beats_round_to_nearest_on_correlated_inputs(spec):
    x = low_rank_inputs(3000, 128)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1
    rtn = QuantizedLinear.from_weight(weight.float(), None, spec, "weight_only").dense_weight()
    result = obs_pass(weight, x.T @ x / x.shape[0], spec=spec, block_size=48)   # blocks that split groups
    stored = QuantizedLinear.from_weight(result.weight.float(), None, spec, "weight_only",
                                         scales=result.scales, zeros=result.zeros)
    # the sweep's weight is exactly on the grid it reports: storing it loses nothing
    steps = expand(stored.scales.double(), 128)
    assert ((stored.dense_weight().double() - result.weight).abs() <= 1e-5 * steps).all()
    assert output_error(x, weight, result.weight) < 0.5 * output_error(x, weight, rtn)


def test_gptq_through_the_method_and_act_order():
    x = low_rank_inputs(2000, 64, seed=3)
    dense = nn.Linear(64, 40)
    handler = get_method("quantize")
    errors = {}
    for algorithm, act_order in (("rtn", False), ("gptq", False), ("gptq", True)):
        config = handler.parse_config({"scheme": "weight_only", "bits": 4, "group_size": 16,
                                       "algorithm": algorithm, "act_order": act_order})
        result = handler.compress_layer("layer", dense, stats_of(x), config)
        layer = result.module
        assert isinstance(layer, QuantizedLinear) and layer.bits == 4 and layer.group_size == 16
        assert torch.equal(layer.bias, dense.bias)
        assert result.metrics["output_err"] == pytest.approx(output_error(x, dense.weight, layer.dense_weight()),
                                                             rel=1e-3)
        errors[algorithm, act_order] = result.metrics["output_err"]
    assert errors["gptq", False] < 0.7 * errors["rtn", False], errors
    assert errors["gptq", True] < 0.7 * errors["rtn", False], errors


def test_gptq_keeps_a_sparse_layers_mask():
    x = low_rank_inputs(1000, 32, seed=4)
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    mask = torch.rand(16, 32, generator=torch.Generator().manual_seed(5)) > 0.6
    sparse = SparseLinear.from_weight(weight, mask, torch.zeros(16))
    handler = get_method("quantize")
    config = handler.parse_config({"scheme": "weight_only", "bits": 4, "algorithm": "gptq"})
    layer = handler.compress_layer("layer", sparse, stats_of(x), config).module
    assert layer.nnz == int(mask.sum())
    assert torch.equal(layer.sparsity_mask(), mask)
    assert not layer.dense_weight()[~mask].any()


# --- the quantized linear layer -----------------------------------------------------------------------------

def test_dynamic_forward_runs_the_int8_kernel_and_matches_dequantized_weights():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    layer = QuantizedLinear.from_weight(dense.weight.detach(), dense.bias.detach(), GridSpec(8), "dynamic")
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        expected = F.linear(x, layer.dense_weight(), layer.bias)
        out, reference = layer(x), dense(x)
    assert layer.ran_packed_kernel
    assert out.shape == (3, 10, 48)
    assert float((out - expected).norm() / expected.norm()) < 0.05
    assert float((out - reference).norm() / reference.norm()) < 0.05
    # a changed bias reaches the kernel (the packed weight is rebuilt, not reused stale)
    with torch.no_grad():
        layer.bias.add_(1.0)
        shifted = layer(x)
    assert float((shifted - out - 1.0).abs().max()) < 1e-3


def _positive_inputs_and_layers(bits: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Inputs all of one sign (the worst case for an int16 pair sum) and the same int8 weights at each bits."""
    torch.manual_seed(0)
    dense = nn.Linear(384, 256)
    layers = {b: QuantizedLinear.from_weight(dense.weight.detach(), dense.bias.detach(), GridSpec(8), "dynamic",
                                             activation_bits=b) for b in bits}
    x = 4 * torch.rand(16, 384)
    return x, F.linear(x, layers[bits[0]].dense_weight(), layers[bits[0]].bias).detach(), layers


@pytest.mark.skipif(not full_range_safe(), reason="8-bit activations need an int8 kernel that sums in int32 (VNNI)")
def test_eight_bit_activations_halve_the_kernels_error():
    x, expected, layers = _positive_inputs_and_layers((7, 8))
    with torch.no_grad():
        errors = {b: float((layer(x) - expected).norm() / expected.norm()) for b, layer in layers.items()}
    assert all(layer.ran_packed_kernel for layer in layers.values())
    assert errors[8] < 0.7 * errors[7], errors


def test_eight_bit_layers_run_at_seven_bits_where_the_kernel_would_saturate(monkeypatch, caplog):
    import lmcompress.layers.quantized as quantized

    x, _, layers = _positive_inputs_and_layers((7, 8))
    monkeypatch.setattr(quantized, "full_range_safe", lambda: False)
    quantized._warn_once.cache_clear()
    with torch.no_grad(), caplog.at_level("WARNING", logger="lmcompress"):
        assert torch.equal(layers[8](x), layers[7](x))
        layers[8](x)
    assert sum("run at 7 bits here" in r.getMessage() for r in caplog.records) == 1   # once, not per call


def test_activation_bits_default_to_what_this_cpu_holds_exactly_and_are_saved(tiny_bert, tokenizer, tmp_path):
    from lmcompress.core.int8_activations import default_activation_bits, sums_in_int32

    assert sums_in_int32(frozenset({"avx2", "avx512_vnni"}), "x86") and sums_in_int32(frozenset(), "qnnpack")
    assert not sums_in_int32(frozenset({"avx2", "fma"}), "x86")
    lmcompress.compress(tiny_bert, Recipe.single("quantize"), tokenizer, progress=False)
    layers = [m for m in tiny_bert.modules() if isinstance(m, QuantizedLinear)]
    assert layers and {m.activation_bits for m in layers} == {default_activation_bits()}
    seven = QuantizedLinear(32, 16, scheme="dynamic", activation_bits=7).manifest_entry()
    eight = QuantizedLinear(32, 16, scheme="dynamic", activation_bits=8).manifest_entry()
    assert "activation_bits" not in seven and eight["activation_bits"] == 8   # 7-bit entries as before
    assert layer_from_manifest(eight).activation_bits == 8 and layer_from_manifest(seven).activation_bits == 7
    with pytest.raises(ValueError, match="'activation_bits' must be 7 or 8"):
        layer_from_manifest({**eight, "activation_bits": 16})
    lmcompress.save(tiny_bert, tmp_path / "m", tokenizer)
    again = lmcompress.load(tmp_path / "m")
    assert [m.activation_bits for m in again.modules() if isinstance(m, QuantizedLinear)] == \
        [m.activation_bits for m in layers]


def test_smoothing_moves_an_outlier_feature_into_the_weights_and_cuts_the_int8_error():
    from lmcompress.calibration.stats import ActivationSummary, LayerStats
    from lmcompress.methods.quantization.quantize import smoothing_factors

    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    x = torch.randn(4, 16, 64)
    x[..., 5] *= 60       # one outlier feature, as BERT-class encoders have in every block
    rows = x.reshape(-1, 64).double()
    stats = LayerStats(summary=ActivationSummary(rows.sum(0), rows.abs().sum(0), (rows ** 2).sum(0), rows.shape[0],
                                                 max_abs=rows.abs().amax(0)))
    factors = smoothing_factors("layer", dense.weight.detach(), stats, 0.5)
    assert factors[5] == factors.max() and factors[5] > 5 * factors.median()
    weight = dense.weight.detach()
    plain = QuantizedLinear.from_weight(weight, dense.bias.detach(), GridSpec(8), "dynamic")
    smooth = QuantizedLinear.from_weight(weight * factors, dense.bias.detach(), GridSpec(8), "dynamic",
                                         input_scale=1 / factors)
    with torch.no_grad():
        reference = dense(x)
        errors = {name: float((layer(x) - reference).norm() / reference.norm())
                  for name, layer in (("plain", plain), ("smooth", smooth))}
        assert smooth.ran_packed_kernel
        # the weight it applies to the raw input is still W (smoothing folded back), up to the grid
        assert float((smooth.dense_weight() - weight).norm() / weight.norm()) < 0.05
    assert errors["smooth"] < errors["plain"] / 2, errors
    again = QuantizedLinear.from_manifest(smooth.manifest_entry())
    again.load_state_dict(smooth.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), smooth(x))
    plain_entry = plain.manifest_entry()
    assert "smoothed" not in plain_entry and smooth.manifest_entry()["smoothed"] is True   # plain entries as before
    with pytest.raises(ValueError, match="scheme 'dynamic' only"):
        QuantizedLinear(64, 48, scheme="weight_only", smoothed=True)
    with torch.no_grad():   # a half-precision input comes back in its own dtype
        assert smooth(x.bfloat16()).dtype == torch.bfloat16 and smooth.ran_packed_kernel
    no_stats = LayerStats()
    with pytest.raises(CalibrationError, match="smooth needs calibration statistics"):
        smoothing_factors("layer", weight, no_stats, 0.5)


def test_gptq_on_a_smoothed_layer_uses_the_smoothed_inputs_second_moment():
    """GPTQ compensates rounding through the second moment of what the layer multiplies: for a smoothed layer,
    the inputs divided by s. With the moment of the raw inputs instead, it would compensate the wrong errors."""
    from lmcompress.calibration.stats import ActivationSummary, LayerStats
    from lmcompress.methods.quantization.quantize import Quantize, QuantizeConfig

    torch.manual_seed(1)
    dense = nn.Linear(64, 32)
    mix = torch.randn(64, 64) / 8 + torch.eye(64)        # correlated inputs, where GPTQ has something to do
    x = torch.randn(2048, 64) @ mix
    x[:, 3] *= 40
    rows = x.double()
    stats = LayerStats(gram=rows.T @ rows, count=rows.shape[0],
                       summary=ActivationSummary(rows.sum(0), rows.abs().sum(0), (rows ** 2).sum(0), rows.shape[0],
                                                 max_abs=rows.abs().amax(0)))
    with torch.no_grad():
        reference = dense(x)
        errors = {}
        for algorithm in ("rtn", "gptq"):
            config = QuantizeConfig(smooth=0.5, algorithm=algorithm)
            layer = Quantize().compress_layer("layer", dense, stats, config).module
            assert layer.smoothed
            errors[algorithm] = float((layer(x) - reference).norm() / reference.norm())
    assert errors["gptq"] < errors["rtn"], errors


@pytest.mark.parametrize("spec", [GridSpec(8, None, True), GridSpec(4, 16, False)], ids=str)
def test_weight_only_forward_is_exactly_the_dequantized_linear(spec):
    torch.manual_seed(1)
    dense = nn.Linear(32, 24)
    layer = QuantizedLinear.from_weight(dense.weight.detach(), dense.bias.detach(), spec, "weight_only")
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.dense_weight(), layer.bias))
    assert not layer.ran_packed_kernel
    assert type(layer.to_dense()) is nn.Linear
    assert torch.equal(layer.to_dense().weight, layer.dense_weight())


def test_quantized_layer_rebuilds_from_its_manifest_entry():
    torch.manual_seed(2)
    weight, mask = torch.randn(8, 32), torch.rand(8, 32) > 0.5
    layer = QuantizedLinear.from_weight(weight, None, GridSpec(4, 8, False), "weight_only", "Conv1D", mask)
    empty = layer_from_manifest(json.loads(json.dumps(layer.manifest_entry())))
    empty.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(empty.dense_weight(), layer.dense_weight())
    assert empty.to_dense().__class__.__name__ == "Conv1D"


def test_invalid_layer_options():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizedLinear(16, 8, bits=3)
    with pytest.raises(ValueError, match="does not divide"):
        QuantizedLinear(16, 8, bits=4, group_size=6)
    with pytest.raises(ValueError, match="needs bits=8"):
        QuantizedLinear(16, 8, bits=4, scheme="dynamic")


# --- whole models: save / load --------------------------------------------------------------------------------

STACKS = {
    "dynamic": [{"method": "quantize"}],
    "gptq_int4_g16": [{"method": "quantize", "options": {"scheme": "weight_only", "bits": 4, "group_size": 16,
                                                         "algorithm": "gptq"}}],
    "svd_then_quantize": [{"method": "whitened_svd", "options": {"keep": 0.5}}, {"method": "quantize"}],
    "sparsegpt24_then_int4": [{"method": "sparsify", "options": {"pattern": "2:4", "score": "sparsegpt"}},
                              {"method": "quantize", "options": {"scheme": "weight_only", "bits": 4}}],
    "quantize_then_prune": [{"method": "quantize"}, {"method": "sparsify", "options": {"sparsity": 0.5}}],
    "smoothquant": [{"method": "quantize", "options": {"smooth": 0.5}}],
    "smoothquant_gptq": [{"method": "quantize", "options": {"smooth": 0.8, "algorithm": "gptq"}}],
    "smoothquant_then_prune": [{"method": "quantize", "options": {"smooth": 0.5}},
                               {"method": "sparsify", "options": {"sparsity": 0.5}}],
}


def make_model(family, tokenizer):
    if family == "bert":
        return make_tiny_bert(tokenizer.vocab_size)
    return make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def dense_sizes(tokenizer, tmp_path_factory):
    """Bytes of each tiny model saved uncompressed."""
    sizes = {}
    for family in ("bert", "gpt2"):
        path = tmp_path_factory.mktemp("dense") / family
        lmcompress.save(make_model(family, tokenizer), path)
        sizes[family] = (path / WEIGHTS_NAME).stat().st_size
    return sizes


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("stack", list(STACKS))
def test_compressed_model_saves_and_loads_exactly(family, stack, tokenizer, examples, dense_sizes, tmp_path):
    model = make_model(family, tokenizer)
    recipe = Recipe.from_dict({"stages": STACKS[stack], "calibration": CALIBRATION})
    summary = lmcompress.compress(model, recipe, tokenizer, examples, progress=False)
    targeted = summary.stage_layers(1)
    assert targeted and all(r.replaced for r in summary.layers)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized
    kind = "Linear" if family == "bert" else "Conv1D"

    if stack == "svd_then_quantize":     # the factors became quantized; the low-rank shells stayed
        assert all(n.endswith((".first", ".second")) for n in quantized)
        assert all(isinstance(m.first, QuantizedLinear) and isinstance(m.second, QuantizedLinear)
                   for m in model.modules() if isinstance(m, LowRankLinear))
    else:
        assert {q.dense_kind for q in quantized.values()} == {kind}
    if stack == "sparsegpt24_then_int4":
        for layer in quantized.values():
            mask = layer.sparsity_mask()
            assert layer.bits == 4 and layer.nnz == mask.numel() // 2
            assert (mask.reshape(mask.shape[0], -1, 4).sum(dim=2) == 2).all()
            assert not layer.dense_weight()[~mask].any()
    if stack in ("quantize_then_prune", "smoothquant_then_prune"):
        assert all(q.nnz is not None and q.scheme == "dynamic" for q in quantized.values())
    if stack.startswith("smoothquant"):
        assert all(q.smoothed and q.input_scale is not None and not torch.equal(q.input_scale,
                                                                                   torch.ones_like(q.input_scale))
                   for q in quantized.values())

    expected = logits(model, tokenizer)
    lmcompress.save(model, tmp_path / "out", tokenizer, recipe)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert set(manifest["replaced"]) == set(compressed_modules(model))
    for name, entry in manifest["replaced"].items():
        assert entry["type"] == type(model.get_submodule(name)).__name__
    reloaded = lmcompress.load(tmp_path / "out")
    assert torch.equal(logits(reloaded, tokenizer), expected)
    for name, layer in quantized.items():
        again = reloaded.get_submodule(name)
        assert isinstance(again, QuantizedLinear) and again.scheme == layer.scheme
        assert torch.equal(again.dense_weight(), layer.dense_weight())

    # bytes: every targeted float32 weight cost 4 bytes; at least half of that must be saved
    size = (tmp_path / "out" / WEIGHTS_NAME).stat().st_size
    assert dense_sizes[family] - size > 0.5 * 4 * sum(r.params_before for r in targeted), (size, dense_sizes[family])


def test_sparse_mask_survives_quantization_exactly(tiny_bert, tokenizer, examples):
    prune = Recipe.from_dict({"stages": [{"method": "sparsify", "options": {"pattern": "2:4", "score": "wanda"}}],
                              "calibration": CALIBRATION})
    lmcompress.compress(tiny_bert, prune, tokenizer, examples, progress=False)
    masks = {n: m.sparsity_mask() for n, m in tiny_bert.named_modules() if isinstance(m, SparseLinear)}
    assert len(masks) == 12
    quantize = Recipe.from_dict({"stages": [{"method": "quantize", "options": {
        "scheme": "weight_only", "bits": 4, "group_size": 16, "algorithm": "gptq"}}], "calibration": CALIBRATION})
    lmcompress.compress(tiny_bert, quantize, tokenizer, examples, progress=False)
    for name, mask in masks.items():
        layer = tiny_bert.get_submodule(name)
        assert isinstance(layer, QuantizedLinear)
        assert torch.equal(layer.sparsity_mask(), mask)
        assert not layer.dense_weight()[~mask].any()
        assert layer.codes.numel() == math.ceil(int(mask.sum()) / 2)   # only the kept codes are stored


@pytest.mark.parametrize("options", [{"scheme": "weight_only", "bits": 4, "group_size": 16},
                                     {"scheme": "dynamic", "smooth": 0.5}], ids=["int4-g16", "int8-smoothed"])
def test_pruning_a_quantized_layer_keeps_its_grid(tiny_bert, tokenizer, examples, options):
    recipe = Recipe.from_dict({"stages": [{"method": "quantize", "options": options}], "calibration": CALIBRATION})
    lmcompress.compress(tiny_bert, recipe, tokenizer, examples, progress=False)
    before = {n: (m.dense_weight(), m.scales.clone(), m.zeros, m.input_scale)
              for n, m in tiny_bert.named_modules() if isinstance(m, QuantizedLinear)}
    prune = Recipe.from_dict({"stages": [{"method": "sparsify", "options": {"sparsity": 0.5, "score": "wanda"}}],
                              "calibration": CALIBRATION})
    lmcompress.compress(tiny_bert, prune, tokenizer, examples, progress=False)
    for name, (weight, scales, zeros, input_scale) in before.items():
        layer = tiny_bert.get_submodule(name)
        assert isinstance(layer, QuantizedLinear) and layer.bits == options.get("bits", 8)
        assert layer.group_size == options.get("group_size") and torch.equal(layer.scales, scales)
        assert (zeros is None and layer.zeros is None) or torch.equal(layer.zeros, zeros)
        assert (input_scale is None and layer.input_scale is None) or torch.equal(layer.input_scale, input_scale)
        mask = layer.sparsity_mask()
        assert abs(float(mask.float().mean()) - 0.5) <= 1 / layer.in_features
        new = layer.dense_weight()
        assert torch.equal(new[mask], weight[mask])   # wanda moves no weight: kept codes are the old codes
        assert not new[~mask].any()


# --- embeddings ---------------------------------------------------------------------------------------------

def test_quantized_embeddings(tiny_bert, tokenizer, tmp_path):
    original = tiny_bert.bert.embeddings.word_embeddings.weight.detach().clone()
    recipe = Recipe.single("quantize", targets=["word_embeddings"], scheme="weight_only", bits=8)
    summary = lmcompress.compress(tiny_bert, recipe, tokenizer, progress=False)
    assert [r.name for r in summary.layers] == ["bert.embeddings.word_embeddings"]
    embedding = tiny_bert.bert.embeddings.word_embeddings
    assert isinstance(embedding, QuantizedEmbedding) and embedding.codes.dtype == torch.int8
    table = embedding.dense_weight()
    steps = expand(embedding.scales, table.shape[1])
    assert ((table - original).abs() <= steps / 2 + 1e-5 * steps).all()
    ids = torch.tensor([[101, 7, 2000], [0, 102, 30000]])
    assert torch.equal(embedding(ids), table[ids])
    assert torch.equal(tiny_bert.get_input_embeddings().weight, table)

    expected = logits(tiny_bert, tokenizer)
    lmcompress.save(tiny_bert, tmp_path / "out", tokenizer, recipe)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["replaced"]["bert.embeddings.word_embeddings"]["type"] == "QuantizedEmbedding"
    reloaded = lmcompress.load(tmp_path / "out")
    assert torch.equal(logits(reloaded, tokenizer), expected)
    assert parameters_by_component(reloaded)["embeddings"] == parameters_by_component(
        make_tiny_bert(tokenizer.vocab_size))["embeddings"]


def test_int4_grouped_embeddings(tiny_gpt2):
    original = tiny_gpt2.transformer.wte.weight.detach().clone()
    recipe = Recipe.single("quantize", targets=[r"\.wte$"], scheme="weight_only", bits=4, group_size=8)
    lmcompress.compress(tiny_gpt2, recipe, progress=False)
    embedding = tiny_gpt2.transformer.wte
    assert isinstance(embedding, QuantizedEmbedding) and embedding.codes.shape == (original.shape[0], 16)
    table = embedding.dense_weight()
    steps = expand(embedding.scales, 32)
    assert ((table - original).abs() <= steps / 2 + 1e-5 * steps).all()
    ids = torch.tensor([5, 17, 0, 5])
    assert torch.equal(embedding(ids), table[ids])


# --- bad options: one-line errors ---------------------------------------------------------------------------

def assert_one_line(err: pytest.ExceptionInfo) -> None:
    assert len(str(err.value).strip().splitlines()) == 1, str(err.value)


@pytest.mark.parametrize("options, message", [
    ({"bits": 3}, "bits must be 8 or 4, got 3"),
    ({"scheme": "dynamic", "bits": 4}, "scheme=dynamic runs PyTorch's int8 kernels"),
    ({"group_size": 16}, "scheme=dynamic runs PyTorch's int8 kernels"),
    ({"scheme": "weight_only", "symmetric": False, "bits": 8, "group_size": 0}, "greater than or equal to 1"),
    ({"scheme": "int2"}, "scheme"),
    ({"algorithm": "awq"}, "algorithm"),
    ({"bits": 8, "keep": 0.5}, "keep"),
    ({"scheme": "weight_only", "smooth": 0.5}, "smooth evens out"),
    ({"smooth": 1.5}, "less than or equal to 1"),
    ({"scheme": "weight_only", "activation_bits": 8}, "activation_bits is for scheme=dynamic"),
    ({"activation_bits": 6}, "activation_bits"),
])
def test_bad_quantize_options_are_one_line(options, message):
    with pytest.raises(RecipeError, match=message) as err:
        Recipe.single("quantize", **options)
    assert_one_line(err)


def test_quantize_refuses_a_budget():
    with pytest.raises(RecipeError, match="sized by bits and group_size") as err:
        Recipe.single("quantize", budget={"params": 0.5})
    assert_one_line(err)


def test_group_size_must_divide_every_targeted_width(tiny_bert, tokenizer):
    recipe = Recipe.single("quantize", scheme="weight_only", bits=4, group_size=24)
    with pytest.raises(RecipeError, match="group_size 24 does not divide the 32 inputs of bert") as err:
        lmcompress.compress(tiny_bert, recipe, tokenizer, progress=False)
    assert_one_line(err)
    assert not compressed_modules(tiny_bert)   # refused before any layer changed


def test_embeddings_take_only_weight_only_rtn(tiny_bert, tokenizer, examples):
    for options in ({"scheme": "dynamic"}, {"scheme": "weight_only", "algorithm": "gptq"}):
        recipe = Recipe.single("quantize", targets=["word_embeddings"], **options)
        with pytest.raises(RecipeError, match="embeddings are quantized with scheme=weight_only") as err:
            lmcompress.compress(tiny_bert, recipe, tokenizer, examples, progress=False)
        assert_one_line(err)
    assert isinstance(tiny_bert.bert.embeddings.word_embeddings, nn.Embedding)


def test_odd_width_int4_embeddings_are_a_recipe_error(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=200, hidden_size=33, num_hidden_layers=1,
                                                     num_attention_heads=3, intermediate_size=40)).eval()
    recipe = Recipe.single("quantize", targets=["word_embeddings"], scheme="weight_only", bits=4)
    with pytest.raises(RecipeError, match="even width") as err:
        lmcompress.compress(model, recipe, progress=False)
    assert_one_line(err)


def test_gptq_needs_calibration_data(tiny_bert, tokenizer):
    recipe = Recipe.single("quantize", algorithm="gptq")
    with pytest.raises(CalibrationError, match="needs calibration data") as err:
        lmcompress.compress(tiny_bert, recipe, tokenizer, None, progress=False)
    assert_one_line(err)
    handler = get_method("quantize")
    with pytest.raises(CalibrationError, match="gptq needs calibration statistics"):
        handler.compress_layer("layer", nn.Linear(8, 8), None, handler.parse_config({"algorithm": "gptq"}))


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    model = make_tiny_bert(tokenizer.vocab_size)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("options, message", [
    (["bits=3"], "bits must be 8 or 4, got 3"),
    (["scheme=dynamic", "bits=4"], "scheme=dynamic runs PyTorch's int8 kernels"),
    (["scheme=weight_only", "bits=4", "group_size=24"], "group_size 24 does not divide"),
])
def test_cli_bad_quantize_options_exit_2_with_one_line(model_dir, tmp_path, capsys, options, message):
    out = tmp_path / "out"
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "quantize", "--option", *options,
                 "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_cli_quantizes_and_saves(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "quantize", "--option",
                 "scheme=weight_only", "bits=4", "group_size=16", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    entries = list(manifest["replaced"].values())
    assert len(entries) == 12 and all(e["type"] == "QuantizedLinear" and e["bits"] == 4 and e["group_size"] == 16
                                      for e in entries)


# --- FLOPs and parameter counts -------------------------------------------------------------------------------

def test_flops_and_parameters_of_a_dynamically_quantized_model(tiny_model, tokenizer):
    dense_flops = count_flops(tiny_model, seq_len=16)
    dense_params = parameters_by_component(tiny_model)
    lmcompress.compress(tiny_model, Recipe.single("quantize"), tokenizer, progress=False)
    layers = [m for m in tiny_model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.scheme == "dynamic" for m in layers)
    flops = count_flops(tiny_model, seq_len=16)
    assert all(m.ran_packed_kernel for m in layers)   # the counter did not see these products itself
    assert abs(flops - dense_flops) <= 0.01 * dense_flops, (flops, dense_flops)
    assert parameters_by_component(tiny_model) == dense_params
    # the quantized products are in the total, not merely the attention and the rest
    linear_flops = sum(2 * m.in_features * m.out_features * 16 for m in layers)
    assert flops > linear_flops


def test_parameters_of_a_pruned_quantized_model_count_the_kept_weights(tiny_bert, tokenizer):
    dense = parameters_by_component(tiny_bert)
    recipe = Recipe.from_dict({"stages": [{"method": "quantize"},
                                          {"method": "sparsify", "options": {"sparsity": 0.5,
                                                                             "score": "magnitude"}}]})
    summary = lmcompress.compress(tiny_bert, recipe, tokenizer, progress=False)
    removed = sum(r.params_before - r.params_after for r in summary.stage_layers(2))
    after = parameters_by_component(tiny_bert)
    assert removed > 0
    assert sum(dense.values()) - sum(after.values()) == removed
    assert after["embeddings"] == dense["embeddings"]


def test_quantized_model_still_predicts_like_the_dense_one(tiny_bert, tokenizer):
    expected = logits(tiny_bert, tokenizer, SENTENCES[:4])
    lmcompress.compress(tiny_bert, Recipe.single("quantize"), tokenizer, progress=False)
    got = logits(tiny_bert, tokenizer, SENTENCES[:4])
    assert float((got - expected).norm() / expected.norm()) < 0.05


def test_tied_embeddings_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    recipe = Recipe.from_dict({"stages": [{"method": "quantize", "targets": ["wte$"],
                                           "options": {"scheme": "weight_only"}}]})
    with pytest.raises(RecipeError, match="tied to the output head"):
        lmcompress.compress(model, recipe, progress=False)
