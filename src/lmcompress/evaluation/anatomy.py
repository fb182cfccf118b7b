"""Where a transformer's parameters and FLOPs live (`lmcompress anatomy`), from its config alone.

The model is built on PyTorch's meta device (shapes without storage), so even an 11B-parameter architecture
is measured in about a second, with no weights loaded or downloaded. Names and module types are read
generically (no table per family), so encoder-decoders such as T5 are covered as well as encoders and decoders.

What is counted:

- parameters: every tensor the model holds, once (tied input/output embeddings once). Norms are modules whose
  class name contains "Norm". Embeddings are embedding tables outside the blocks, plus output layers as wide
  as the vocabulary (an untied LM head is the output embedding). Attention is everything inside a block's attention
  modules: q/k/v, output projection, T5's relative position bias and cross-attention. Feed-forward is the rest of a
  block. Other is whatever lies outside the blocks: poolers and task heads.
- FLOPs for one sequence of `seq_len` tokens (encoder-decoders: `seq_len` tokens in and `seq_len` out): 2 x the
  weight elements of each dense layer for every token it reads (a pooler reads one), plus 2 x 2 x seq_len^2 x width
  for each attention module's scores and weighted sum (width: the input of its output projection, i.e. heads x
  head size). Norms, activations, softmax, biases and embedding lookups are not counted (elementwise work or gathers).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lmcompress.core.linear import in_out_features, is_dense_linear

PARTS = ("embeddings", "attention", "feed_forward", "norms", "other")
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass
class Block:
    stack: str      # qualified name of the ModuleList holding the block, e.g. "encoder.block"
    index: int
    attention: int = 0
    feed_forward: int = 0
    norms: int = 0
    total: int = 0
    flops: int = 0


@dataclass
class Anatomy:
    model: str                         # what was asked for: a directory, a config file or a shipped name
    model_type: str
    architecture: str
    seq_len: int
    params: dict[str, int]             # evaluate's keys (total, embeddings, attention, feed_forward, other) + norms
    flops: int
    flops_by_component: dict[str, int]
    blocks: list[Block] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _block_lists(model: nn.Module) -> list[str]:
    """Names of the outermost ModuleLists that hold parameters: the stacks of repeated blocks (T5 has two)."""
    stacks: list[str] = []
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) and next(module.parameters(), None) is not None
                and not any(name.startswith(s + ".") for s in stacks)):
            stacks.append(name)
    return stacks


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _is_attention(name: str, module: nn.Module) -> bool:
    return bool(_ATTENTION.search(name.rsplit(".", 1)[-1]) or _ATTENTION.search(type(module).__name__))


class _Locator:
    """Which block (if any) and which part each module belongs to."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.stacks = _block_lists(model)
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)

    def block_of(self, name: str) -> tuple[str, int] | None:
        for stack in self.stacks:
            if name.startswith(stack + "."):
                return stack, int(name[len(stack) + 1:].split(".", 1)[0])
        return None

    def attention_root(self, name: str) -> str | None:
        """The outermost attention module around `name` inside its block, or None."""
        where = self.block_of(name)
        if where is None:
            return None
        parts = name.split(".")
        start = len(f"{where[0]}.{where[1]}".split("."))
        for end in range(start + 1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if _is_attention(prefix, self.modules[prefix]):
                return prefix
        return None

    def part_of(self, name: str, module: nn.Module) -> str:
        if _is_norm(module):
            return "norms"
        if self.block_of(name) is not None:
            return "attention" if self.attention_root(name) else "feed_forward"
        if isinstance(module, nn.Embedding) or "embed" in name.lower():
            return "embeddings"
        if is_dense_linear(module) and self.vocab_size and in_out_features(module)[1] == self.vocab_size:
            return "embeddings"
        return "other"


def _attention_width(root: nn.Module) -> int:
    """Heads x head size: what the attention module's output projection (its last dense layer) reads."""
    last = [m for m in root.modules() if is_dense_linear(m)]
    return in_out_features(last[-1])[0] if last else 0


def measure(model: nn.Module, seq_len: int = 128, label: str = "") -> Anatomy:
    """Parameters and FLOPs of `model` by part and by block (see the module docstring for what is counted)."""
    where = _Locator(model)
    params = dict.fromkeys(PARTS, 0)
    flops = dict.fromkeys(PARTS, 0)
    blocks: dict[tuple[str, int], Block] = {}
    seen: set[int] = set()
    for name, module in where.modules.items():
        part = where.part_of(name, module)
        located = where.block_of(name)
        block = blocks.setdefault(located, Block(*located)) if located else None
        count = 0
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                count += param.numel()
        cost = 0
        if is_dense_linear(module):
            tokens = 1 if "pooler" in name.split(".") else seq_len
            cost = 2 * module.weight.numel() * tokens
        if where.attention_root(name) == name:  # scores and weighted sum, once per attention module
            cost += 4 * seq_len * seq_len * _attention_width(module)
        params[part] += count
        flops[part] += cost
        if block is not None:
            if part in ("attention", "feed_forward", "norms"):
                setattr(block, part, getattr(block, part) + count)
            block.total += count
            block.flops += cost
    total = sum(params.values())
    return Anatomy(model=label, model_type=getattr(getattr(model, "config", None), "model_type", "") or "",
                   architecture=type(model).__name__, seq_len=seq_len, params={"total": total, **params},
                   flops=sum(flops.values()), flops_by_component={"total": sum(flops.values()), **flops},
                   blocks=sorted(blocks.values(), key=lambda b: (where.stacks.index(b.stack), b.index)))


def build_on_meta(data: dict, source: str = "config") -> nn.Module:
    """The model a config describes, with every tensor on the meta device: shapes only, nothing allocated.

    The class is the config's `architectures` entry where transformers has it (so a checkpoint's heads are counted),
    else the base model of its type. A config that says `tie_word_embeddings: false` gets its own output embedding
    even where transformers ties it regardless (recent releases tie every T5/mT5 from a config, and untie only
    when a checkpoint's two matrices differ, as mT5's do)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    from lmcompress.errors import ModelLoadError, first_line

    model_type = data["model_type"]
    if model_type not in transformers.CONFIG_MAPPING:
        raise ModelLoadError(f"{source}: unknown model type {model_type!r} (not in transformers "
                             f"{transformers.__version__})")
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in data.items() if k != "model_type"})
    except Exception as err:  # the config classes validate with several error types; each means "not valid"
        raise ModelLoadError(f"{source}: not a valid {model_type} config: {_one_line(err)}") from None
    cls = _architecture_class(transformers, config, data.get("architectures"))
    try:
        with torch.device("meta"):
            model = cls(config) if cls is not None else AutoModel.from_config(config)
    except Exception as err:  # any library error here means "this config cannot be built"
        raise ModelLoadError(f"{source}: cannot build a {model_type} model: {first_line(err)}") from None
    if data.get("tie_word_embeddings") is False:
        _untie_output_embeddings(model)
    return model


def _one_line(err: Exception) -> str:
    """Validation errors put the field on the first line and the reason on the next: keep both, on one line."""
    from lmcompress.errors import first_line

    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else first_line(err)


def _architecture_class(transformers, config, architectures) -> type | None:
    names = architectures if isinstance(architectures, list) else []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    config_class = getattr(cls, "config_class", None)
    if isinstance(cls, type) and isinstance(config_class, type) and isinstance(config, config_class):
        return cls
    return None


def _untie_output_embeddings(model: nn.Module) -> None:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inputs, outputs = get_in() if get_in else None, get_out() if get_out else None
    if inputs is not None and outputs is not None and outputs.weight is inputs.weight:
        outputs.weight = nn.Parameter(torch.empty_like(outputs.weight, device="meta"), requires_grad=False)


def anatomy(spec: str, seq_len: int = 128) -> Anatomy:
    """The anatomy of a model directory, config JSON file or shipped config name (see `lmcompress.core.configs`)."""
    from lmcompress.core.configs import read_config_dict

    data, source = read_config_dict(spec)
    return measure(build_on_meta(data, source), seq_len, spec)


def describe(result: Anatomy) -> str:
    """A readable table: parts with their share, then blocks (runs of identical blocks on one line)."""
    total, flops = result.params["total"], result.flops
    both = any("decoder" in b.stack.split(".") for b in result.blocks)
    tokens = f"{result.seq_len} tokens" + (" in and out" if both else "")
    lines = [f"{result.model}: {result.architecture} ({result.model_type}); FLOPs for one sequence of {tokens}",
             "", f"{'part':<14}{'parameters':>16}{'%':>8}{'GFLOPs':>12}{'%':>8}"]
    for part in (*PARTS, "total"):
        count, cost = result.params[part], result.flops_by_component[part]
        lines.append(f"{part:<14}{count:>16,}{100 * count / max(total, 1):>7.1f}%{cost / 1e9:>12.3f}"
                     f"{100 * cost / max(flops, 1):>7.1f}%")
    if result.blocks:
        lines += ["", f"{'blocks':<28}{'attention':>14}{'feed_forward':>14}{'norms':>10}{'total':>14}{'GFLOPs':>10}"]
        for first, last in _runs(result.blocks):
            label = f"{first.stack}.{first.index}" + (f"-{last.index}" if last is not first else "")
            lines.append(f"{label:<28}{first.attention:>14,}{first.feed_forward:>14,}{first.norms:>10,}"
                         f"{first.total:>14,}{first.flops / 1e9:>10.3f}" + (" each" if last is not first else ""))
    lines += ["", "FLOPs: 2 per weight per token in dense layers (the embeddings' are the projection onto the",
              "vocabulary), plus attention scores and weighted sums; norms, activations, softmax and lookups are not",
              "counted."]
    return "\n".join(lines)


def _runs(blocks: list[Block]) -> list[tuple[Block, Block]]:
    """(first, last) of each run of consecutive blocks in one stack with the same counts."""
    runs: list[tuple[Block, Block]] = []
    same = ("stack", "attention", "feed_forward", "norms", "total", "flops")
    for block in blocks:
        if runs and all(getattr(runs[-1][1], k) == getattr(block, k) for k in same):
            runs[-1] = (runs[-1][0], block)
        else:
            runs.append((block, block))
    return runs
