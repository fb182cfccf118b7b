"""`mask_train`: learned masks reach their sparsity or N:M pattern exactly, the scores learn through the
straight-through estimator, the schedule is cubic and monotone, the best is chosen only at the target, and the
result stacks with int8, saves, reloads and resumes exactly; bad options are one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES, make_tiny_bert
from torch import nn

from lmcompress.calibration.settings import Calibration
from lmcompress.engine.pipeline import compress
from lmcompress.engine.recipe import Recipe, Stage
from lmcompress.errors import LMCompressError, RecipeError
from lmcompress.io.saving import load, save
from lmcompress.layers.quantized import QuantizedLinear
from lmcompress.layers.sparse import SparseLinear
from lmcompress.methods.masks._masking import MaskedLinear, cubic_sparsity, scheduled_mask
from lmcompress.tasks import Examples

CALIBRATION = Calibration(samples=8, batch_size=4, max_length=16)
FAST = {"batch_size": 8, "eval_batch_size": 16, "max_length": 16, "checkpoints": 3}

pytestmark = pytest.mark.usefixtures("one_thread", "plotting_loaded")


@pytest.fixture(scope="module")
def plotting_loaded():
    """The scheduler keeps the measured cost of its first curve plot in reserve; importing matplotlib there (a
    second or more) would eat a few-second budget before any step."""
    pytest.importorskip("matplotlib.pyplot")


def examples() -> Examples:
    texts = SENTENCES * 3
    return Examples(texts=texts, text_pairs=None, labels=[i % 2 for i in range(len(texts))],
                    label_names=("negative", "positive"))


def run(model: nn.Module, tokenizer, stages: list[dict]):
    recipe = Recipe(stages=[Stage(**s) for s in stages], calibration=CALIBRATION)
    return compress(model, recipe, tokenizer, examples(), progress=False, timing=False)


def outputs(model: nn.Module, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch, output_hidden_states=True).hidden_states[-1].float()


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny BERT trained to 80% sparsity in 6 s (the contract and the family tests run the mildest size); the
    schedule follows the clock, so a budget of a few steps fails on a loaded machine."""
    model = make_tiny_bert(tokenizer.vocab_size)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    options = {"sparsity": 0.8, "time": 6, "ramp": 0.3, **FAST}
    summary = run(model, tokenizer, [{"method": "mask_train", "options": options}])
    return model, dense, summary


def test_target_sparsity_is_reached_exactly_in_every_matrix(trained):
    model, dense, summary = trained
    layers = sparse_layers(model)
    assert len(layers) == 12   # every linear layer of the two blocks
    for layer in layers.values():
        size = layer.in_features * layer.out_features
        assert layer.nnz == size - round(0.8 * size)
        assert int(layer.sparsity_mask().sum()) == layer.nnz
    report = summary.stages[0].report
    assert report["reached_target"] and report["steps"] > 0


def test_weights_train_with_the_masks(trained):
    model, dense, _ = trained
    moved = [float((layer.dense_weight().detach() - dense[name] * layer.sparsity_mask()).abs().max())
             for name, layer in sparse_layers(model).items()]
    assert max(moved) > 0   # movement pruning: the kept weights were trained too


def test_nm_pattern_is_valid_and_stacks_with_int8_and_reloads_exactly(tokenizer, tmp_path):
    model = make_tiny_bert(tokenizer.vocab_size)
    stages = [{"method": "mask_train", "options": {"pattern": "2:4", "time": 1.0, "init": "wanda", **FAST}},
              {"method": "quantize", "options": {"scheme": "dynamic"}}]
    run(model, tokenizer, stages)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 12
    for layer in quantized.values():
        mask = layer.dense_weight().detach() != 0
        groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all() and float(groups.float().mean()) > 1.9   # 2:4 (a kept weight may round to 0)
    got = outputs(model, tokenizer)
    save(model, tmp_path / "m", tokenizer)
    torch.testing.assert_close(outputs(load(tmp_path / "m"), tokenizer), got, atol=0, rtol=0)


def test_saved_mask_trained_model_reloads_exactly(trained, tokenizer, tmp_path):
    model = trained[0]
    save(model, tmp_path / "m", tokenizer)
    again = load(tmp_path / "m")
    assert set(sparse_layers(again)) == set(sparse_layers(model))
    torch.testing.assert_close(outputs(again, tokenizer), outputs(model, tokenizer), atol=0, rtol=0)


def test_scores_receive_the_straight_through_gradient():
    torch.manual_seed(0)
    dense = nn.Linear(8, 4)
    layer = MaskedLinear(dense, torch.rand(4, 8), None, 0.5)
    x = torch.randn(3, 8)
    layer(x).pow(2).sum().backward()
    mask = layer.mask().float()
    weight = dense.weight.detach()
    # d loss / d W' where W' = W * mask, by hand
    y = x @ (weight * mask).T + dense.bias.detach()
    grad_effective = (2 * y).T @ x
    torch.testing.assert_close(layer.scores.grad, grad_effective * weight)    # dL/dS = dL/dW' * W
    torch.testing.assert_close(layer.weight.grad, grad_effective * mask)     # pruned weights get none
    assert bool((layer.scores.grad[mask == 0] != 0).any())   # pruned weights' scores still learn


def test_a_layer_an_earlier_stage_pruned_starts_from_its_mask_and_computes_the_same():
    torch.manual_seed(0)
    original = nn.Linear(16, 8)
    kept = torch.rand(8, 16) > 0.7
    pruned = SparseLinear.from_weight(original.weight.detach() * 1.5, kept, original.bias.detach())  # "updated"
    layer = MaskedLinear.from_sparse(pruned, original.weight.detach(), None, 1 - float(kept.float().mean()))
    assert torch.equal(layer.mask(), kept)   # the scores reproduce the mask at its own sparsity
    torch.testing.assert_close(layer.weight.detach()[~kept], original.weight.detach()[~kept])   # weights before
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), pruned(x))
    gap = layer.scores.detach()[kept].min() - layer.scores.detach()[~kept].max()
    assert 0.8 < float(gap) < 1.0   # small enough for the straight-through gradient to swap weights


def test_mask_training_after_sparsegpt_starts_from_its_masks_and_weights(tokenizer):
    model = make_tiny_bert(tokenizer.vocab_size)
    sparsegpt = {"method": "sparsify", "options": {"score": "sparsegpt", "sparsity": 0.8}}
    start = make_tiny_bert(tokenizer.vocab_size)
    run(start, tokenizer, [sparsegpt])
    # rates too small to swap a weight or move one: the result is SparseGPT's model, masks and updated weights
    options = {"sparsity": 0.8, "time": 2, "score_lr": 1e-9, "lr_global": 1e-12, **FAST}
    summary = run(model, tokenizer, [sparsegpt, {"method": "mask_train", "options": options}])
    assert summary.stages[1].report["reached_target"]   # the start is at the target, so it counts before any step
    before, after = sparse_layers(start), sparse_layers(model)
    assert set(after) == set(before) and len(after) == 12
    for name, layer in after.items():
        assert torch.equal(layer.sparsity_mask(), before[name].sparsity_mask())
        torch.testing.assert_close(layer.values, before[name].values, atol=1e-6, rtol=0)


def test_schedule_is_cubic_monotone_and_holds_after_the_ramp():
    fractions = [i / 100 for i in range(101)]
    values = [cubic_sparsity(f, 0.1, 0.9, 0.6) for f in fractions]
    assert values[0] == pytest.approx(0.1) and values[60] == 0.9 and values[-1] == 0.9
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[30] == pytest.approx(0.9 - 0.8 * 0.5 ** 3)     # halfway through the ramp: (1 - 1/2)^3 left
    # masks shrink monotonically along it, and an N:M mask grows into its pattern
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    kept = [int(scheduled_mask(scores, cubic_sparsity(f, 0.0, 0.5, 0.6), (2, 4)).sum()) for f in fractions]
    assert kept[0] == scores.numel() and kept[-1] == scores.numel() // 2
    assert all(b <= a for a, b in zip(kept, kept[1:], strict=False))
    final = scheduled_mask(scores, 0.5, (2, 4)).reshape(8, 4, 4).sum(-1)
    assert (final == 2).all()
    assert torch.equal(scheduled_mask(scores, 0.7, None, exact=False), scheduled_mask(scores, 0.7, None))


def test_best_is_chosen_only_at_the_target_and_a_rerun_resumes_it(tokenizer, tmp_path):
    options = {"sparsity": 0.75, "time": 3, "workdir": str(tmp_path / "run"), "train_weights": False, **FAST}
    model = make_tiny_bert(tokenizer.vocab_size)
    run(model, tokenizer, [{"method": "mask_train", "options": options}])
    points = json.loads((tmp_path / "run" / "curve.json").read_text())["points"]
    assert not points[0]["best"] and any(p["best"] for p in points)   # the start (sparsity 0) is never kept
    got = outputs(model, tokenizer)
    again = make_tiny_bert(tokenizer.vocab_size)
    summary = run(again, tokenizer, [{"method": "mask_train", "options": options}])   # the run's own workdir
    assert summary.stages[0].report["reached_target"]
    torch.testing.assert_close(outputs(again, tokenizer), got, atol=1e-6, rtol=0)


def test_language_model_objective_trains_a_causal_lm(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2,
                                       n_positions=64, pad_token_id=tokenizer.pad_token_id)).eval()
    run(model, tokenizer, [{"method": "mask_train", "options": {"sparsity": 0.5, "time": 1.0, "objective": "lm",
                                                                 **FAST}}])
    layers = sparse_layers(model)
    assert len(layers) == 8 and {layer.dense_kind for layer in layers.values()} == {"Conv1D"}
    assert all(layer.nnz * 2 == layer.in_features * layer.out_features for layer in layers.values())


@pytest.mark.parametrize(("stage", "words"), [
    ({"options": {"sparsity": 0.5, "pattern": "2:4"}}, "either sparsity or pattern"),
    ({"options": {"pattern": "4:2"}}, "N:M with 0 < N < M"),
    ({"options": {"sparsity": 0.5, "initial_sparsity": 0.7}}, "above the target"),
    ({"options": {"time": "soon"}}, "expected a duration"),
    ({"options": {"init": "sparsegpt"}}, "put a sparsify stage (score: sparsegpt) before mask_train"),
    ({"options": {"init": "obs"}}, "init"),
    ({"budget": {"flops": 0.5}}, "a stage budget sizes structured masks"),
])
def test_bad_options_are_one_line(stage, words):
    with pytest.raises(RecipeError) as err:
        Recipe(stages=[Stage(method="mask_train", **stage)]).resolved()
    assert "\n" not in str(err.value) and words in str(err.value)


def test_lm_objective_on_a_classifier_and_a_width_outside_the_pattern_are_refused(tokenizer):
    for options, words in (({"objective": "lm"}, "needs a causal language model"),
                           ({"pattern": "3:7"}, "multiple of 7")):
        model = make_tiny_bert(tokenizer.vocab_size)
        with pytest.raises(LMCompressError) as err:
            run(model, tokenizer, [{"method": "mask_train", "options": {"time": 0.5, **options}}])
        assert "\n" not in str(err.value) and words in str(err.value)
        assert not sparse_layers(model)


def test_structured_masks_after_a_sparsify_stage_are_refused_in_one_line(tokenizer):
    model = make_tiny_bert(tokenizer.vocab_size)
    stages = [{"method": "sparsify", "options": {"score": "magnitude", "sparsity": 0.5}},
              {"method": "mask_train", "options": {"structured": True, "time": 0.5, **FAST},
               "budget": {"flops": 0.5}}]
    with pytest.raises(LMCompressError) as err:
        run(model, tokenizer, stages)
    assert "\n" not in str(err.value) and "structured masks need dense layers" in str(err.value)
