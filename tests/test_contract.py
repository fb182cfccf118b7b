"""The contract every compression method and every compressed layer type keeps, checked for all of them.

Methods are taken from `available_methods()` and layer types from the layer registry, never from a list here:
a new method or layer type is checked as soon as it registers. SETUPS and LAYER_BUILDERS only say how to run
one (its "identity-most" size, the data it needs); one missing from them is still run with its defaults, and the
test that wants its entry fails saying so.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES, make_tiny_bert
from safetensors.torch import load_file, save_file
from torch import nn

import lmcompress.methods as methods_package
from lmcompress.calibration.settings import Calibration
from lmcompress.engine.layer_timing import outermost_compressed
from lmcompress.engine.pipeline import CompressionSummary, compress, compressed_model
from lmcompress.engine.recipe import Recipe
from lmcompress.errors import RecipeError
from lmcompress.io.saving import load, save
from lmcompress.kernels.quantgrid import GridSpec
from lmcompress.layers import (
    BottleneckAdapter,
    CompressedLayer,
    FourierMixing,
    LinearBlock,
    LoRALinear,
    QuantizedEmbedding,
    layer_from_manifest,
    layer_types,
)
from lmcompress.methods import available_methods, get_method
from lmcompress.methods.base import registered_methods
from lmcompress.tasks import Examples

CALIBRATION = Calibration(samples=8, batch_size=4, max_length=16)
LOSSLESS_ATOL = 1e-4     # float32 round-off of an exact factorisation; hidden states are O(1)
CLOSE_ISH = 0.1          # lossy methods at their mildest: at most this fraction of the largest dense output


@dataclass(frozen=True)
class Setup:
    """How to run one method at its "identity-most" size (the one that should change the model least)."""

    options: dict[str, Any] = field(default_factory=dict)
    targets: list[str] | None = None
    lossless: bool = True          # False: no size reproduces the model; outputs are checked finite and close-ish
    bfloat16: str | None = None    # why a bfloat16 model does not stay bfloat16 (None: it must)
    student: bool = False          # the result is a new model of another architecture: its outputs are checked sane


FULL_RANK = {"rank": 4096, "always_factorize": True}     # low-rank methods clip the rank to min(out, in)
SETUPS: dict[str, Setup] = {
    "svd": Setup(FULL_RANK),
    "whitened_svd": Setup(FULL_RANK),
    "fisher_svd": Setup(FULL_RANK),
    # 32 terms is the full rank of every tiny-BERT layer's rearranged matrix (and refused above it)
    "kronecker": Setup({"terms": 32, "always_factorize": True}),
    "whitened_kronecker": Setup({"terms": 32, "always_factorize": True}),
    # the largest TT-rank of the 32 x 32 attention layers (a larger one is refused for them)
    "tensor_train": Setup({"rank": 8, "always_factorize": True}, targets=["attention"]),
    "whitened_tensor_train": Setup({"rank": 8, "always_factorize": True, "steps": 0}, targets=["attention"]),
    # int8 rounding (and dynamic activation quantization) is never exact: close, not equal
    "quantize": Setup({"bits": 8}, lossless=False,
                      bfloat16="QuantizedLinear keeps its scales and bias in float32 by design"),
    "sparsify": Setup({"sparsity": 0.0, "score": "magnitude"}),
    # float32 is the cast that changes nothing (bfloat16's own checks: tests/methods/quantization/test_cast.py)
    "cast": Setup({"dtype": "float32"}, bfloat16="cast gives the dtype its options name: float32 here"),
    "prune": Setup({"keep": 1.0}),
    # a block is always removed (count >= 1): the mildest setting is one block, with a linear stand-in
    "drop_blocks": Setup({"count": 1, "score": "last", "replace": "linear"}, lossless=False),
    "vocab": Setup({}),            # keeps every token the texts use: the same outputs through the new tokenizer
    # a model distilled towards itself starts at zero divergence, which the best checkpoint keeps
    "distill": Setup({"time": 0.5, "checkpoints": 2, "batch_size": 8, "eval_batch_size": 16, "max_length": 16}),
    # nothing masked: the start (the model itself, zero divergence) is the best, and every weight is kept
    "mask_train": Setup({"sparsity": 0.0, "time": 0.5, "checkpoints": 2, "batch_size": 8, "eval_batch_size": 16,
                         "max_length": 16}),
    # every feed-forward neuron kept, no training: the selection keeps the block as it is
    "learned": Setup({"structure": "ffn", "width": 64, "init": "select", "epochs": 0}),
    # a confidence threshold above 1 never fires: every row runs every block, as the dense model does
    "early_exit": Setup({"time": 0.5, "threshold": 1.01, "max_length": 16}),
    # no block swapped is the only lossless setting (Fourier mixing replaces attention; tests/methods/mixing)
    "fourier_mixing": Setup({"blocks": []}),
    # a DAN student replaces the whole model: no setting reproduces a transformer, and it trains in float32
    "dan": Setup({"dim": 8, "hidden": 8, "epochs": 1, "subword": 3}, lossless=False, student=True,
                 bfloat16="the DAN student trains in float32 whatever the teacher's dtype"),
}
METHODS = available_methods()


pytestmark = pytest.mark.usefixtures("one_thread")


def setup_of(name: str) -> Setup:
    return SETUPS.get(name, Setup())


def require_setup(name: str) -> None:
    if name not in SETUPS:
        pytest.fail(f"method {name!r} is missing from SETUPS in tests/test_contract.py: add its identity-most "
                    "options (it was run with its defaults)")


def calibration_examples() -> Examples:
    return Examples(texts=SENTENCES, text_pairs=None, labels=[i % 2 for i in range(len(SENTENCES))],
                    label_names=("negative", "positive"))


def outputs(model: nn.Module, tokenizer) -> torch.Tensor:
    """The last hidden state (O(1) values, unlike a random classifier's near-zero logits), in float32; the logits
    of a student that has no hidden states."""
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(**batch, output_hidden_states=True)
        return (out.logits if out.hidden_states is None else out.hidden_states[-1]).float()


def run_method(name: str, tokenizer, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, CompressionSummary]:
    setup = setup_of(name)
    model = make_tiny_bert(tokenizer.vocab_size).to(dtype)
    recipe = Recipe.single(name, targets=setup.targets, calibration=CALIBRATION, **setup.options)
    summary = compress(model, recipe, tokenizer, calibration_examples(), progress=False, timing=False)
    return compressed_model(summary, model), summary


@pytest.fixture(scope="module")
def compressed(tokenizer) -> Callable[[str], tuple[nn.Module, Any, torch.Tensor, torch.Tensor]]:
    """(model, tokenizer after, dense outputs, compressed outputs) per method, compressed once per module."""
    cache: dict[str, tuple[nn.Module, Any, torch.Tensor, torch.Tensor]] = {}

    def get(name: str):
        if name not in cache:
            dense = outputs(make_tiny_bert(tokenizer.vocab_size), tokenizer)
            model, summary = run_method(name, tokenizer)
            after = summary.tokenizer or tokenizer
            cache[name] = (model, after, dense, outputs(model, after))
        return cache[name]

    return get


# --- every method ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_identity_most_size_reproduces_the_dense_model(name, compressed):
    require_setup(name)
    _, _, dense, got = compressed(name)
    if setup_of(name).student:   # another architecture: one finite output row per text
        assert torch.isfinite(got).all() and got.shape[0] == dense.shape[0]
    elif setup_of(name).lossless:
        torch.testing.assert_close(got, dense, atol=LOSSLESS_ATOL, rtol=0)
    else:   # lossy at any size: the mildest setting must still give a working model near the dense one
        assert torch.isfinite(got).all()
        assert float((got - dense).abs().max()) <= CLOSE_ISH * float(dense.abs().max())


@pytest.mark.parametrize("name", METHODS)
def test_unknown_option_is_a_one_line_recipe_error_naming_the_method(name):
    with pytest.raises(RecipeError) as err:
        Recipe.single(name, no_such_option=1)
    message = str(err.value)
    assert "\n" not in message and repr(name) in message and "no_such_option" in message


@pytest.mark.parametrize("name", METHODS)
def test_save_then_load_reproduces_the_outputs_exactly(name, compressed, tmp_path):
    model, tokenizer, _, got = compressed(name)
    save(model, tmp_path / "model", tokenizer)
    torch.testing.assert_close(outputs(load(tmp_path / "model"), tokenizer), got, atol=0, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_float32_on_cpu_stays_float32_on_cpu(name, compressed):
    model = compressed(name)[0]
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"cpu"}
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("name", METHODS)
def test_bfloat16_model_stays_bfloat16(name, tokenizer):
    reason = setup_of(name).bfloat16
    if reason is not None:
        pytest.skip(reason)
    model, _ = run_method(name, tokenizer, torch.bfloat16)
    float_params = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    assert set(float_params.values()) == {torch.bfloat16}, float_params


def _method_files() -> dict[str, str]:
    """{file stem: module} of every method file, methods/<family>/<name>.py not starting with `_`."""
    root = Path(methods_package.__file__).parent
    return {p.stem: f"lmcompress.methods.{p.parent.name}.{p.stem}"
            for p in sorted(root.glob("*/*.py")) if not p.name.startswith("_")}


def test_registry_equals_the_method_files():
    files = _method_files()
    for module in files.values():
        importlib.import_module(module)
    registered_by: dict[str, set[str]] = {}
    for name, method in registered_methods().items():
        registered_by.setdefault(type(method).__module__, set()).add(name)
    wrong = {stem: registered_by.get(module, set()) for stem, module in files.items()
             if registered_by.get(module, set()) != {stem}}
    assert not wrong, f"method files that do not register exactly the method named by their stem: {wrong}"
    # methods registered from outside the package (tests, plug-ins) are not files of it
    builtin = {n for n in available_methods() if type(get_method(n)).__module__.startswith("lmcompress.")}
    assert builtin == set(files)


# --- every layer type --------------------------------------------------------------------------------------
def _dense(out_features: int = 16, in_features: int = 32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features)


def _by_method(name: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        method = get_method(name)
        return method.compress_layer("layer", _dense(), None, method.parse_config(options)).module
    return build


def _embedding() -> QuantizedEmbedding:
    torch.manual_seed(0)
    return QuantizedEmbedding.from_embedding(nn.Embedding(40, 16, padding_idx=0), GridSpec(8, None, True))


def _linear_block() -> LinearBlock:
    dense = _dense(32, 32)
    return LinearBlock.from_weights(dense.weight.detach(), dense.bias.detach())


def _lora(rank: int = 4) -> LoRALinear:
    layer = LoRALinear(_dense(), rank, scaling=2.0)
    with torch.no_grad():
        layer.lora_b.weight.normal_(0, 0.1)   # a trained path (a new one is zero)
    return layer


def _bottleneck() -> BottleneckAdapter:
    layer = BottleneckAdapter(_dense(), 8)
    with torch.no_grad():
        layer.up.weight.normal_(0, 0.1)
    return layer


# {layer type: builders of small examples, each from a dense layer (through a method where one makes the type)}
LAYER_BUILDERS: dict[str, list[Callable[[], nn.Module]]] = {
    "LowRankLinear": [_by_method("svd", rank=8, always_factorize=True)],
    "KroneckerLinear": [_by_method("kronecker", terms=4, always_factorize=True)],
    "TTLinear": [_by_method("tensor_train", rank=2, always_factorize=True)],
    "SparseLinear": [_by_method("sparsify", sparsity=0.5, score="magnitude")],
    "QuantizedLinear": [_by_method("quantize", scheme="dynamic"),
                        _by_method("quantize", scheme="weight_only", bits=4, group_size=16)],
    "QuantizedEmbedding": [_embedding],
    "LinearBlock": [_linear_block],
    "FourierMixing": [lambda: FourierMixing(32), lambda: FourierMixing(32, normalized=True, gain=0.37)],
    "LoRALinear": [_lora],
    "BottleneckAdapter": [_bottleneck],
}
LAYER_TYPES = sorted(layer_types())


def _examples_of(kind: str) -> list[CompressedLayer]:
    if kind not in LAYER_BUILDERS:
        pytest.fail(f"layer type {kind!r} is missing from LAYER_BUILDERS in tests/test_contract.py")
    layers = [build() for build in LAYER_BUILDERS[kind]]
    assert all(type(layer).__name__ == kind for layer in layers)
    return layers


def _input_for(layer: CompressedLayer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Module) and hasattr(layer, "num_embeddings"):
        return torch.randint(0, layer.num_embeddings, (3, 5), generator=generator)
    return torch.randn(3, 5, layer.in_features, generator=generator)


def _run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return layer(x)


@pytest.mark.parametrize("kind", LAYER_TYPES)
def test_layer_saves_and_loads_exactly_through_its_manifest_entry(kind, tmp_path):
    for index, layer in enumerate(_examples_of(kind)):
        entry = json.loads(json.dumps(layer.manifest_entry()))   # as the saved manifest holds it
        file = tmp_path / f"{index}.safetensors"
        save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(file))
        rebuilt = layer_from_manifest(entry)
        rebuilt.load_state_dict(load_file(str(file)), strict=True)
        x = _input_for(layer)
        torch.testing.assert_close(_run(rebuilt.eval(), x), _run(layer.eval(), x), atol=0, rtol=0)


@pytest.mark.parametrize("kind", LAYER_TYPES)
def test_layer_type_carries_its_export_and_timing_knowledge(kind):
    cls = layer_types()[kind]
    assert isinstance(cls.timed_against_dense, bool) and isinstance(cls.onnx_exportable, bool)
    assert cls.onnx_exportable, f"{kind} is not marked as checked with the ONNX export"
    assert isinstance(cls.onnx_translations(), dict)
    for layer in _examples_of(kind):
        assert isinstance(layer.onnx_role(), str) and layer.onnx_role()
        # the timing reads the attribute, not the type
        assert bool(outermost_compressed(nn.ModuleDict({"layer": layer}))) == cls.timed_against_dense
        form = layer.onnx_form()
        assert isinstance(form, nn.Module)
        if form is not layer:   # a stand-in for the graph must compute the layer's dense map
            x = _input_for(layer)
            expected = F.linear(x, layer.dense_weight().float(), None if layer.bias is None else layer.bias.float())
            torch.testing.assert_close(_run(form, x), expected, atol=1e-5, rtol=1e-5)
