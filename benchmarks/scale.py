"""Scale: wall time and peak host memory of compressing Llama-shaped models, by size, depth and offloading.

Models are built from configs with random weights in bfloat16 and written as sharded safetensors one block at
a time (so a model larger than this machine's memory can be made), then compressed by the `lmcompress`
command in a child process; the child's peak resident memory comes from `wait4`. Calibration text is
WikiText-2 (raw, valid split). Rows are saved after each run, so a stopped run keeps what it measured.

    python benchmarks/scale.py --preset cpu            # the depth-doubling test, then methods at 0.1B
    python benchmarks/scale.py --preset big            # a model larger than the free memory, --offload disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, load_rows, made_by, save_rows
from safetensors.torch import save_file

WIKITEXT = ROOT.parent / "shared" / "data" / "lm" / "wikitext-2-raw"
CACHE = ROOT / ".cache" / "scale"

# name -> (hidden, intermediate, layers, heads, key/value heads)
SHAPES = {
    "tiny": (128, 256, 2, 4, 2),
    "llama-0.1b": (768, 2048, 12, 12, 4),
    "depth-4": (1024, 2816, 4, 16, 4),
    "depth-8": (1024, 2816, 8, 16, 4),
    "llama-11.6b": (4096, 11008, 56, 32, 8),
}
METHODS = {
    "int4 GPTQ g128": ["--method", "quantize", "--option", "bits=4", "--option", "scheme=weight_only",
                       "--option", "algorithm=gptq", "--option", "group_size=128"],
    "int4 RTN g128": ["--method", "quantize", "--option", "bits=4", "--option", "scheme=weight_only",
                      "--option", "group_size=128"],
    "whitened_svd keep 0.5": ["--method", "whitened_svd", "--keep", "0.5"],
    "whitened_svd params=0.5": ["--method", "whitened_svd", "--budget", "params=0.5"],
    "prune kcm flops=0.5": ["--method", "prune", "--option", "score=kcm", "--budget", "flops=0.5"],
    "prune magnitude flops=0.5": ["--method", "prune", "--option", "score=magnitude", "--option",
                                  "compensate=none", "--budget", "flops=0.5"],
    "sparsify sparsegpt 50%": ["--method", "sparsify", "--option", "score=sparsegpt", "--option", "sparsity=0.5"],
    "sparsify wanda 50%": ["--method", "sparsify", "--option", "score=wanda", "--option", "sparsity=0.5"],
    "distill 120s": [],   # `lmcompress distill` into a half-rank SVD student: steps per second (see `run`)
}
PRESETS = {
    "tiny": [("tiny", m, o) for m in ("int4 GPTQ g128", "sparsify wanda 50%") for o in ("none", "disk")]
    + [("tiny", "distill 120s", "none")],
    "cpu": [(size, "int4 GPTQ g128", offload) for size in ("depth-4", "depth-8") for offload in ("none", "disk")]
    + [("llama-0.1b", method, "none") for method in ("int4 GPTQ g128", "whitened_svd keep 0.5",
                                                     "whitened_svd params=0.5", "prune kcm flops=0.5",
                                                     "sparsify sparsegpt 50%", "distill 120s")],
    "big": [("llama-11.6b", "int4 RTN g128", "disk"), ("llama-11.6b", "prune magnitude flops=0.5", "disk"),
            ("llama-11.6b", "sparsify wanda 50%", "disk")],
}


def make_checkpoint(name: str, vocab_size: int) -> Path:
    """A random bf16 Llama of the named shape, written block by block (cached)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    folder = CACHE / name
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    hidden, inter, layers, heads, kv = SHAPES[name]
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", tie_word_embeddings=False)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=CACHE))
    weight_map: dict[str, str] = {}
    torch.manual_seed(0)

    def write(state: dict[str, torch.Tensor], index: int) -> None:
        file = f"model-{index:05d}-of-{layers + 1:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / file))
        weight_map.update({k: file for k in state})

    for i in range(layers):
        print(f"  writing block {i + 1}/{layers} of {name}", flush=True)
        block = LlamaDecoderLayer(config, i).to(torch.bfloat16)
        with torch.no_grad():
            for param in block.parameters():
                if param.dim() > 1:
                    param.normal_(0, 0.02)
        write({f"model.layers.{i}.{k}": v for k, v in block.state_dict().items()}, i + 1)
        del block
    write({"model.embed_tokens.weight": torch.randn(vocab_size, hidden, dtype=torch.bfloat16) * 0.02,
           "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
           "lm_head.weight": torch.randn(vocab_size, hidden, dtype=torch.bfloat16) * 0.02}, layers + 1)
    config.save_pretrained(tmp)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    from lmcompress.io.models import bundled_model_path, load_tokenizer

    load_tokenizer(str(bundled_model_path())).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def run(model: Path, method: str, offload: str, samples: int, length: int) -> dict:
    """One `lmcompress compress` in a child process: wall seconds and the child's peak resident memory."""
    out = Path(tempfile.mkdtemp(prefix="scale-out-", dir=CACHE))
    if method.startswith("distill"):
        # the student: the model with every block's linears factorised at half rank (data-free, not timed)
        subprocess.run([sys.executable, "-m", "lmcompress.cli", "compress", "--model", str(model), "--method", "svd",
                        "--keep", "0.5", "--task", "lm", "--data", str(WIKITEXT), "--no-timing", "--out",
                        str(out / "student")], check=True, capture_output=True)
        command = [sys.executable, "-m", "lmcompress.cli", "distill", "--teacher", str(model), "--student",
                   str(out / "student"), "--task", "lm", "--data", str(WIKITEXT), "--time", "120s", "--phases",
                   "global", "--max-length", str(length), "--batch-size", "4", "--max-train-samples", "2000",
                   "--heldout", "0.02", "--out", str(out / "m")]
    else:
        command = [sys.executable, "-m", "lmcompress.cli", "compress", "--model", str(model), *METHODS[method],
                   "--task", "lm", "--data", str(WIKITEXT), "--calib-samples", str(samples), "--calib-max-length",
                   str(length), "--out", str(out / "m"), "--no-timing", "--offload", offload]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    curve = out / "m" / "curve.json"
    points = json.loads(curve.read_text()).get("points", []) if curve.is_file() else []
    # training steps per second between the first checkpoint (after the teacher's held-out outputs) and the last
    span = points[-1]["elapsed_s"] - points[0]["elapsed_s"] if len(points) > 1 else 0
    rate = round((points[-1]["step"] - points[0]["step"]) / span, 2) if span > 0 else None
    shutil.rmtree(out, ignore_errors=True)
    plan = next((line for line in output.splitlines() if line.startswith("plan:")), "")
    ok = os.waitstatus_to_exitcode(status) == 0
    if not ok:
        print(output[-2000:], flush=True)
    return {"seconds": round(seconds, 1), "peak_host_gib": round(usage.ru_maxrss * 1024 / 2**30, 2), "ok": ok,
            "error": "" if ok else output.strip().splitlines()[-1][:200], "plan": plan, "steps_per_s": rate}


def table(rows: list[dict]) -> str:
    lines = ["| model | params | layers | hidden | method | offload | wall s | peak host GiB | host / weights |"
             " distill steps/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["peak_host_gib"] * 2**30 / r["weight_bytes"]
        status = "" if r["ok"] else f" (failed: {r['error']})"
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['layers']} | {r['hidden']} | {r['method']} | "
                     f"{r['offload']} | {r['seconds']}{status} | {r['peak_host_gib']} | {ratio:.2f} | "
                     f"{r.get('steps_per_s') or ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--length", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--out", default=None, help="table (default docs/benchmarks/scale_<preset>.md)")
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out or ROOT / "docs" / "benchmarks" / f"scale_{args.preset}.md")
    rows = load_rows(out)
    done = {(r["model"], r["method"], r["offload"]) for r in rows}
    CACHE.mkdir(parents=True, exist_ok=True)
    from lmcompress.io.checkpoint import Checkpoint
    from lmcompress.io.models import bundled_model_path, load_tokenizer

    vocab = load_tokenizer(str(bundled_model_path())).vocab_size
    for name, method, offload in PRESETS[args.preset]:
        if (name, method, offload) in done:
            continue
        folder = make_checkpoint(name, vocab)
        hidden, _, layers, _, _ = SHAPES[name]
        weight_bytes = Checkpoint(folder).nbytes()
        print(f"{name} ({weight_bytes / 2**30:.1f} GiB) {method} offload={offload}", flush=True)
        result = run(folder, method, offload, args.samples, args.length)
        print(f"  -> {result}", flush=True)
        rows.append({"model": name, "params": weight_bytes // 2, "layers": layers, "hidden": hidden,
                     "method": method, "offload": offload, "weight_bytes": weight_bytes, **result})
        save_rows(out, rows)
    text = [f"# Scale on this machine ({args.preset})", "", made_by(started), "",
            f"Calibration: {args.samples} WikiText-2 sequences of {args.length} tokens; weights bfloat16, random; "
            "peak host memory is the child process's maximum resident set (`wait4`).", "", table(rows), ""]
    out.write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
