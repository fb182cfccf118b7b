"""Subspaces: how much of each matrix type's energy a few directions hold, in the weights, in the task's
input activations, and in the whitened product that `whitened_svd` truncates; pretrained against fine-tuned.

For every linear layer of the bundled MiniLM (pretrained) and of the same model fine-tuned on SST-2 (cached by
benchmarks/common.py), grouped by matrix type (query, key, value, attention output, feed-forward in and out):

- the singular values of W (out x in), of the fine-tuning update W_ft - W_pre, and of W S^1/2, where S is the
  second moment of the layer's inputs on the task's text (what `whitened_svd` truncates: the error it minimises
  is the output error on that data);
- the eigenvalues of S itself;
- from each spectrum: the effective rank (exp of the entropy of the normalised singular values, Roy & Vetterli
  2007) and the share of ranks needed to keep 90% of the energy (sum of squared singular values).

The word-embedding matrix gets the weight spectrum only. Writes docs/benchmarks/subspaces.{md,json,png}.

    python benchmarks/subspaces.py --seed 0 --samples 512
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from common import ROOT, SHARED_GLUE, finetuned_model, made_by

from lmcompress.calibration.collection import collect
from lmcompress.core.linear import is_dense_linear, weight_out_in
from lmcompress.io.models import bundled_model_path, load_model
from lmcompress.tasks import get_task, load_examples
from lmcompress.tasks.batching import encode_batches

TYPES = {"query": r"attention\.self\.query$", "key": r"attention\.self\.key$", "value": r"attention\.self\.value$",
         "attention out": r"attention\.output\.dense$", "ffn in": r"intermediate\.dense$",
         "ffn out": r"\.output\.dense$(?<!attention\.output\.dense)"}
SPECTRA = ("weight", "update", "activations", "whitened")


def matrix_type(name: str) -> str | None:
    return next((kind for kind, pattern in TYPES.items() if re.search(pattern, name)), None)


def effective_rank(singular: torch.Tensor) -> float:
    """exp(entropy) of the singular values normalised to sum 1: 1 for a rank-one matrix, n for a flat spectrum."""
    p = singular.double().clamp_min(0) / singular.double().clamp_min(0).sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def rank_share(singular: torch.Tensor, energy: float = 0.9) -> float:
    """The fraction of the ranks needed to keep `energy` of the sum of squared singular values."""
    squared = singular.double() ** 2
    kept = torch.cumsum(squared, 0) / squared.sum()
    return float((int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype))) + 1) / len(singular))


def energy_curve(singular: torch.Tensor, points: int = 50) -> list[float]:
    """Energy kept at `points` evenly spaced rank fractions (for the plot)."""
    squared = singular.double() ** 2
    kept = torch.cumsum(squared, 0) / squared.sum()
    index = torch.linspace(0, len(kept) - 1, points).round().long()
    return [float(v) for v in kept[index]]


def spectra(model, layers: dict, batches: list) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: the singular values of the weight and of the whitened weight, and the input eigenvalues."""
    stats = collect(model, batches, layers, {"gram"}, progress=False)
    out = {}
    for name, layer in layers.items():
        weight = weight_out_in(layer).detach().double()
        moment = stats[name].second_moment.double()
        eigen, vectors = torch.linalg.eigh(moment)
        root = vectors @ torch.diag(eigen.clamp_min(0).sqrt()) @ vectors.T
        out[name] = {"weight": torch.linalg.svdvals(weight), "activations": eigen.clamp_min(0).flip(0).sqrt(),
                     "whitened": torch.linalg.svdvals(weight @ root)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_GLUE / "SST-2"))
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "benchmarks"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=512, help="dev sentences for the activation statistics")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "subspaces"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    task = get_task("sst2")
    train, dev = load_examples(task, args.data, "train"), load_examples(task, args.data, "dev")
    tuned, tokenizer = finetuned_model(task, train, 16_000, args.seed, Path(args.cache))
    pretrained, _ = load_model(str(bundled_model_path()), num_labels=2)
    batches = list(encode_batches(tokenizer, dev.take(args.samples, seed=args.seed), 32, 64))
    models = {"pretrained": pretrained.eval(), "fine-tuned": tuned.eval()}
    layers = {tag: {n: m for n, m in model.named_modules() if is_dense_linear(m) and matrix_type(n)}
              for tag, model in models.items()}
    results = {tag: spectra(model, layers[tag], batches) for tag, model in models.items()}
    for name in results["fine-tuned"]:
        update = weight_out_in(layers["fine-tuned"][name]).double() - weight_out_in(layers["pretrained"][name]).double()
        results["fine-tuned"][name]["update"] = torch.linalg.svdvals(update.detach())
    for tag, model in models.items():
        embedding = model.get_input_embeddings().weight.detach().double()
        results[tag]["embeddings"] = {"weight": torch.linalg.svdvals(embedding)}

    rows, curves = [], defaultdict(dict)
    for tag, per_layer in results.items():
        by_type: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
        for name, spectra_of in per_layer.items():
            kind = "embeddings" if name == "embeddings" else matrix_type(name)
            for spectrum, values in spectra_of.items():
                by_type[(kind, spectrum)].append(values)
        for (kind, spectrum), values in sorted(by_type.items()):
            ranks = [effective_rank(v) for v in values]
            shares = [rank_share(v) for v in values]
            rows.append({"model": tag, "type": kind, "spectrum": spectrum, "layers": len(values),
                         "size": len(values[0]), "effective_rank": statistics.mean(ranks),
                         "effective_rank_share": statistics.mean(r / len(values[0]) for r in ranks),
                         "rank_share_90": statistics.mean(shares), "rank_share_90_min": min(shares),
                         "rank_share_90_max": max(shares)})
            curves[f"{tag}|{kind}"][spectrum] = [statistics.mean(c) for c in
                                                 zip(*(energy_curve(v) for v in values), strict=True)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "curves": curves}, indent=1))
    plot(curves, out.with_suffix(".png"))
    write_table(rows, out.with_suffix(".md"), started, args)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(TYPES)
    figure, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True, sharey=True)
    colours = {"weight": "tab:blue", "activations": "tab:orange", "whitened": "tab:green", "update": "tab:red"}
    for axis, kind in zip(axes.flat, kinds, strict=True):
        for tag, style in (("pretrained", "--"), ("fine-tuned", "-")):
            for spectrum, values in curves.get(f"{tag}|{kind}", {}).items():
                xs = [i / (len(values) - 1) for i in range(len(values))]
                axis.plot(xs, values, style, color=colours[spectrum],
                          label=f"{spectrum} ({tag})" if kind == kinds[0] else None)
        axis.set_title(kind)
        axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("share of ranks kept")
    for axis in axes[:, 0]:
        axis.set_ylabel("energy kept")
    figure.legend(loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)


def write_table(rows: list[dict], path: Path, started: float, args) -> None:
    lines = [f"# Subspaces of MiniLM's matrices, pretrained and fine-tuned on SST-2 (seed {args.seed})", "",
             made_by(started), "",
             f"Activations: {args.samples} SST-2 dev sentences (up to 64 tokens, padding excluded). Effective rank: "
             "exp of the entropy of the normalised singular values; 90% share: the fraction of ranks that keeps "
             "90% of the energy (mean over layers, with the layers' range). `whitened` is W S^1/2, the product "
             "`whitened_svd` truncates; `update` is W_fine-tuned - W_pretrained.", "",
             "| type | spectrum | model | size | effective rank | as share of size | 90% energy share (range) |",
             "|---|---|---|---|---|---|---|"]
    order = {kind: i for i, kind in enumerate([*TYPES, "embeddings"])}
    for r in sorted(rows, key=lambda r: (order[r["type"]], SPECTRA.index(r["spectrum"]), r["model"])):
        lines.append(f"| {r['type']} | {r['spectrum']} | {r['model']} | {r['size']} | {r['effective_rank']:.0f} | "
                     f"{r['effective_rank_share']:.2f} | {r['rank_share_90']:.2f} "
                     f"({r['rank_share_90_min']:.2f}–{r['rank_share_90_max']:.2f}) |")
    lines += ["", f"![energy kept against rank, by matrix type]({path.with_suffix('.png').name})", ""]
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
