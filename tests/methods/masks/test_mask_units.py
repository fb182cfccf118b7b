"""`mask_train` with `structured: true`: gates over heads and neurons meet a FLOPs budget within one piece, the
gated-off pieces are removed for real with `prune`'s code and the hand-over is exact, the gates' scores get the
straight-through gradient, and the result saves, reloads and stacks with int8 like a pruned model; bad options
are one line."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert, make_tiny_gpt2
from torch.utils.flop_counter import FlopCounterMode

from lmcompress.calibration.settings import Calibration
from lmcompress.core.families import blocks_of
from lmcompress.core.linear import in_out_features, set_submodule
from lmcompress.core.units import group_units
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe, Stage
from lmcompress.errors import LMCompressError, RecipeError
from lmcompress.evaluation.efficiency import dummy_batch
from lmcompress.io.saving import load, save
from lmcompress.kernels.structured import pieces_of
from lmcompress.layers.quantized import QuantizedLinear
from lmcompress.methods.masks._units import GatedLinear, output_name, piece_width, remove_units, select
from lmcompress.tasks import Examples

CALIBRATION = Calibration(samples=8, batch_size=4, max_length=16)
FAST = {"batch_size": 8, "eval_batch_size": 16, "max_length": 16, "checkpoints": 3}
SEQ_LEN = 32
HIDDEN, HEAD_DIM, HEADS, NEURONS = 32, 16, 2, 64   # make_tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread", "plotting_loaded")


@pytest.fixture(scope="module")
def plotting_loaded():
    pytest.importorskip("matplotlib.pyplot")   # the curve plot's first import would eat a tiny time budget


def examples() -> Examples:
    texts = SENTENCES * 3
    return Examples(texts=texts, text_pairs=None, labels=[i % 2 for i in range(len(texts))],
                    label_names=("negative", "positive"))


def run(model, tokenizer, stages: list[dict]):
    recipe = Recipe(stages=[Stage(**s) for s in stages], calibration=CALIBRATION)
    return compress(model, recipe, tokenizer, examples(), progress=False, timing=False)


def outputs(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch, output_hidden_states=True).hidden_states[-1].float()


def block_flops(model) -> int:
    """FLOPs of one example inside the transformer blocks, measured by PyTorch's counter."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(**dummy_batch(model, 1, SEQ_LEN))
    prefix, blocks = blocks_of(model)
    counts = counter.get_flop_counts()
    return sum(sum(counts[f"{type(model).__name__}.{prefix}.{i}"].values()) for i in range(len(blocks)))


def widths(model) -> list[tuple[int, int]]:
    """Per block: (attention width = o's inputs, feed-forward width = out's inputs)."""
    return [(in_out_features(model.get_submodule(a.layers["o"]))[0],
             in_out_features(model.get_submodule(f.layers["out"]))[0])
            for a, f in zip(group_units(model, "attention"), group_units(model, "feed_forward"), strict=True)]


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny BERT's heads and neurons masked to 40% of the blocks' FLOPs in 3 s (magnitude start)."""
    model = make_tiny_bert(tokenizer.vocab_size)
    dense_flops = block_flops(model)
    options = {"structured": True, "time": 6, "ramp": 0.3, **FAST}
    summary = run(model, tokenizer, [{"method": "mask_train", "options": options,
                                      "budget": {"flops": 0.4, "seq_len": SEQ_LEN}}])
    return model, dense_flops, summary


def test_flops_budget_is_met_within_one_piece_and_units_are_removed(trained):
    model, dense_flops, summary = trained
    report = summary.stages[0].report
    assert report["reached_target"] and report["steps"] > 0
    inside = block_flops(model)
    assert inside <= 0.4 * dense_flops
    dearest = SEQ_LEN * (2 * HIDDEN * HEAD_DIM * 4 + 4 * SEQ_LEN * HEAD_DIM)   # one head: the dearest piece
    assert inside > 0.4 * dense_flops - dearest
    kept = widths(model)
    assert all(a % HEAD_DIM == 0 and 0 < a <= HEADS * HEAD_DIM and 0 < f <= NEURONS for a, f in kept)
    assert sum(f for _, f in kept) < 2 * NEURONS   # pieces went for real: narrower weights
    for unit in group_units(model, "feed_forward"):
        width = in_out_features(model.get_submodule(unit.layers["out"]))[0]
        assert in_out_features(model.get_submodule(unit.layers["in"]))[1] == width


@pytest.mark.parametrize("family", ["bert", "gpt2"])   # nn.Linear, and Conv1D with a fused qkv
def test_hand_over_from_gates_to_the_pruned_model_is_exact(tokenizer, family):
    model = (make_tiny_bert(tokenizer.vocab_size, seed=1) if family == "bert"
             else make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id, seed=1))
    units = group_units(model, "attention") + group_units(model, "feed_forward")
    pieces = {u.name: pieces_of(model, u) for u in units}
    generator = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.count, generator=generator) for n, p in pieces.items()}
    costs = {n: float(p.flops_per_piece(HIDDEN, SEQ_LEN)) for n, p in pieces.items()}
    keep = select(scores, costs, 0.5 * sum(costs[n] * p.count for n, p in pieces.items()))
    gated = {}
    for unit in units:
        layer = GatedLinear(model.get_submodule(output_name(unit)), scores[unit.name], piece_width(pieces[unit.name]))
        layer.keep.copy_(keep[unit.name])
        set_submodule(model, output_name(unit), layer)
        gated[unit.name] = layer
    assert any(not bool(k.all()) for k in keep.values())
    before = outputs(model, tokenizer)
    remove_units(model, gated, pieces)
    assert widths(model) == [(int(keep[a.name].sum()) * HEAD_DIM, int(keep[f.name].sum()))
                             for a, f in zip(units[:2], units[2:], strict=True)]
    torch.testing.assert_close(outputs(model, tokenizer), before, atol=1e-5, rtol=0)


def test_gate_scores_receive_the_straight_through_gradient():
    torch.manual_seed(0)
    dense = torch.nn.Linear(6, 3)
    layer = GatedLinear(dense, torch.rand(3), width=2)
    layer.keep.copy_(torch.tensor([True, False, True]))
    x = torch.randn(4, 6)
    layer(x).pow(2).sum().backward()
    gate = torch.tensor([1.0, 1, 0, 0, 1, 1])
    y = (x * gate) @ dense.weight.detach().T + dense.bias.detach()
    grad_input = (2 * y) @ dense.weight.detach()   # dL/dx' where x' = x * gate
    torch.testing.assert_close(layer.scores.grad, (x * grad_input).sum(0).reshape(3, 2).sum(1))
    assert float(layer.scores.grad[1].abs()) > 0   # a gated-off piece's score still learns


def test_select_keeps_the_best_per_cost_and_one_piece_per_unit():
    keep = select({"a": torch.tensor([3.0, 1.0, 2.0]), "b": torch.tensor([0.5, 0.1])}, {"a": 2.0, "b": 1.0}, 3.0)
    assert keep["a"].tolist() == [True, False, False] and keep["b"].tolist() == [True, False]


def test_result_stacks_with_int8_saves_and_reloads_exactly(tokenizer, tmp_path):
    model = make_tiny_bert(tokenizer.vocab_size)
    stages = [{"method": "mask_train", "options": {"structured": True, "init": "fisher", "time": 1.0, **FAST},
               "budget": {"params": 0.5}},
              {"method": "quantize", "options": {"scheme": "dynamic"}}]
    run(model, tokenizer, stages)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 12 and sum(f for _, f in widths(model)) < 2 * NEURONS
    got = outputs(model, tokenizer)
    save(model, tmp_path / "m", tokenizer)
    again = load(tmp_path / "m")
    assert widths(again) == widths(model)
    torch.testing.assert_close(outputs(again, tokenizer), got, atol=0, rtol=0)


@pytest.mark.parametrize(("stage", "words"), [
    ({"options": {"structured": True, "sparsity": 0.5}, "budget": {"flops": 0.5}}, "drop sparsity and pattern"),
    ({"options": {"structured": True, "init": "wanda"}, "budget": {"flops": 0.5}}, "scores weights, not units"),
    ({"options": {"init": "kcm"}}, "needs structured: true"),
    ({"options": {"sparsity": 0.5}, "budget": {"flops": 0.5}}, "a stage budget sizes structured masks"),
    ({"options": {"structured": True}, "budget": {"latency": 0.5}}, "cannot take a latency budget"),
])
def test_bad_options_are_one_line(stage, words):
    with pytest.raises(RecipeError) as err:
        Recipe(stages=[Stage(method="mask_train", **stage)]).resolved()
    assert "\n" not in str(err.value) and words in str(err.value)


@pytest.mark.parametrize(("options", "budget", "words"), [
    ({"structured": True}, None, "sized by a stage budget"),
    ({"structured": True, "initial_sparsity": 0.8}, {"flops": 0.5}, "above what the budget removes"),
    ({"structured": True}, {"flops": 0.001}, "budget too small"),
])
def test_refusals_at_run_time_leave_the_model_as_it_was(tokenizer, options, budget, words):
    model = make_tiny_bert(tokenizer.vocab_size)
    dense = outputs(model, tokenizer)
    with pytest.raises(LMCompressError) as err:
        run(model, tokenizer, [{"method": "mask_train", "options": {"time": 0.5, **options},
                                **({"budget": budget} if budget else {})}])
    assert "\n" not in str(err.value) and words in str(err.value)
    torch.testing.assert_close(outputs(model, tokenizer), dense, atol=0, rtol=0)
