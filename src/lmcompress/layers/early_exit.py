"""Early exits: small heads after chosen blocks of an encoder classifier, and the forward pass that uses them.

Why a model-level attachment rather than a `CompressedLayer`: an exit replaces no module; it adds heads beside
the blocks and changes which rows the later blocks see. The heads live in `model.lmcompress_exits` (so their
weights are saved with the model's), and the model's forward is wrapped per instance (`attach`).

How rows leave a batch: a forward hook after each exit block scores the active rows with that block's head; rows
whose rule fires record their logits and are dropped from the hidden states the hook returns, and a pre-hook on
every later block gathers the same rows of the arguments that still have the full batch (the attention mask).
The model's own code runs the blocks, so pruned, factorised and int8 blocks work unchanged; when every row has
left, the remaining blocks are skipped altogether. The final head then runs on the rows that are left.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.core.families import block_stacks

RULES = ("confidence", "entropy", "patience")
ATTRIBUTE = "lmcompress_exits"


@dataclass(frozen=True)
class ExitRule:
    """When a row leaves: max probability >= threshold (`confidence`), normalised entropy <= threshold
    (`entropy`), or the last `patience` exits agree (`patience`: same class, or for a regressor, each within
    `tolerance` of the previous one)."""

    kind: str = "confidence"
    threshold: float = 1.01        # confidence above 1 / entropy below 0: never exits
    patience: int = 0              # 0: never exits
    tolerance: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExitTrack:
    """Per-row state a rule needs between exits (patience: the previous prediction and the agreement count), as
    tensors (`fires`) or arrays (`fires_array`)."""

    def __init__(self) -> None:
        self.previous: Any = None
        self.count: Any = None

    def keep(self, rows: Any) -> None:
        if self.previous is not None:
            self.previous, self.count = self.previous[rows], self.count[rows]


def fires(rule: ExitRule, logits: torch.Tensor, track: ExitTrack, regression: bool) -> torch.Tensor:
    """Boolean per row: the rule says this row leaves at this exit (updates `track`)."""
    logits = logits.float()
    if rule.kind == "patience":
        prediction = logits[:, 0] if regression else logits.argmax(-1).float()
        if track.previous is None:
            count = torch.ones_like(prediction)
        else:
            agree = (prediction - track.previous).abs() <= (rule.tolerance if regression else 0.0)
            count = torch.where(agree, track.count + 1, torch.ones_like(prediction))
        track.previous, track.count = prediction, count
        return count >= rule.patience if rule.patience > 0 else torch.zeros_like(count, dtype=torch.bool)
    probabilities = logits.softmax(-1)
    if rule.kind == "confidence":
        return probabilities.max(-1).values >= rule.threshold
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1) / math.log(logits.shape[-1])
    return entropy <= rule.threshold


def fires_array(rule: ExitRule, logits: np.ndarray, track: ExitTrack, regression: bool) -> np.ndarray:
    """`fires` on a NumPy array (the same rule, tested equal), for the loop that runs an early-exit model's ONNX
    segments. Why not `fires` itself: any PyTorch op between two ONNX Runtime runs wakes PyTorch's own thread
    pool, whose workers then compete for the cores with ORT's; on MiniLM at batch 8 a loop calling `fires`
    between its six segment graphs took twice as long as the graphs alone."""
    logits = logits.astype(np.float32)
    if rule.kind == "patience":
        prediction = logits[:, 0] if regression else logits.argmax(-1).astype(np.float32)
        if track.previous is None:
            count = np.ones_like(prediction)
        else:
            agree = np.abs(prediction - track.previous) <= (rule.tolerance if regression else 0.0)
            count = np.where(agree, track.count + 1, np.ones_like(prediction))
        track.previous, track.count = prediction, count
        return count >= rule.patience if rule.patience > 0 else np.zeros(count.shape, dtype=bool)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = exp / exp.sum(-1, keepdims=True)
    if rule.kind == "confidence":
        return probabilities.max(-1) >= rule.threshold
    entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(-1) / math.log(logits.shape[-1])
    return entropy <= rule.threshold


POOLINGS = ("first", "mean")


def pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(batch, hidden) from a block's output: the first token's vector, or the mean over the real tokens (a
    sentence-embedding model such as all-MiniLM was pretrained to put its meaning there, and early blocks' first
    tokens have seen little of the sentence)."""
    if pooling == "first":
        return hidden_states[:, 0]
    if attention_mask is None:
        return hidden_states.mean(1)
    weights = attention_mask[:, :hidden_states.shape[1]].to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class ExitHead(nn.Module):
    """A pooled vector (first token, or mean of the real tokens) -> dense -> tanh -> logits: the shape of BERT's
    own pooler and classifier."""

    def __init__(self, hidden: int, outputs: int, pooling: str = "first") -> None:
        super().__init__()
        self.pooling = pooling
        self.dense = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.from_pooled(pool(hidden_states, attention_mask, self.pooling))

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """From the pooled vectors alone (batch, hidden): training on cached vectors uses this."""
        return self.out(torch.tanh(self.dense(pooled.to(self.dense.weight.dtype))))

    def flops(self) -> int:
        return 2 * (self.dense.in_features * self.dense.out_features + self.out.in_features * self.out.out_features)


class ExitHeads(nn.Module):
    """The heads (one per exit position, a block index), the rule, and what the last forward pass did."""

    def __init__(self, positions: list[int], blocks: int, hidden: int, outputs: int,
                 rule: ExitRule | None = None, pooling: str = "first") -> None:
        super().__init__()
        self.positions, self.blocks, self.hidden, self.outputs = list(positions), blocks, hidden, outputs
        self.pooling = pooling
        self.heads = nn.ModuleList(ExitHead(hidden, outputs, pooling) for _ in positions)
        self.rule = rule or ExitRule()
        self.enabled = True
        self.last_exit: torch.Tensor | None = None   # block index per row of the last forward (blocks-1: none)

    @property
    def regression(self) -> bool:
        return self.outputs == 1

    def manifest_entry(self) -> dict[str, Any]:
        return {"positions": self.positions, "blocks": self.blocks, "hidden": self.hidden, "outputs": self.outputs,
                "rule": self.rule.to_dict(), "pooling": self.pooling}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> ExitHeads:
        """Empty heads of the recorded shapes; ValueError for anything `save` never writes."""
        positions, blocks, hidden, outputs, rule, pooling = parse_manifest_entry(entry)
        return cls(positions, blocks, hidden, outputs, rule, pooling)


def parse_manifest_entry(entry: dict[str, Any]) -> tuple[list[int], int, int, int, ExitRule, str]:
    """(positions, blocks, hidden, outputs, rule, pooling) of a saved `manifest_entry`, checked (it comes from a
    model folder, which is untrusted); ValueError in one line for anything `save` never writes."""
    try:
        positions = [int(p) for p in entry["positions"]]
        blocks, hidden, outputs = int(entry["blocks"]), int(entry["hidden"]), int(entry["outputs"])
        rule = ExitRule(**entry["rule"])
        pooling = str(entry.get("pooling", "first"))   # models saved before the option pooled the first token
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"bad early_exit entry in the manifest ({err})") from None
    shapes_ok = bool(positions) and all(0 <= p < blocks - 1 for p in positions) \
        and positions == sorted(set(positions)) \
        and min(hidden, outputs) >= 1
    if rule.kind not in RULES or pooling not in POOLINGS or not shapes_ok:
        raise ValueError("bad early_exit entry in the manifest (rule, pooling, positions or sizes)")
    return positions, blocks, hidden, outputs, rule, pooling


def exits_of(model: nn.Module) -> ExitHeads | None:
    found = getattr(model, ATTRIBUTE, None)
    return found if isinstance(found, ExitHeads) else None


def exit_blocks(model: nn.Module) -> nn.ModuleList:
    """The one stack of blocks exits can follow; ValueError (one line) for models without one."""
    stacks = block_stacks(model)
    if len(stacks) != 1:
        raise ValueError("early exit needs a model of one known stack of blocks (an encoder classifier); "
                         f"{type(model).__name__} has {len(stacks)}")
    return stacks[0][1]


def attach(model: nn.Module, heads: ExitHeads) -> nn.Module:
    """Give `model` its exits: the heads become a submodule and its forward exits early (in place)."""
    setattr(model, ATTRIBUTE, heads)
    # a partial over the model (not a bound method) survives copy.deepcopy: it is rebuilt around the copy
    model.forward = functools.partial(exit_forward, model)
    return model


class _AllExited(Exception):
    """Raised by the last hook that empties the batch: the remaining blocks have nothing to compute."""


def full_forward(model: nn.Module, **inputs: Any) -> Any:
    """The model's own forward pass over every block (no exit), whatever is attached."""
    return type(model).forward(model, **inputs)


def exit_forward(model: nn.Module, **inputs: Any) -> Any:
    """The forward pass with exits (see the module docstring); asking for hidden states or attention maps, or
    training, runs every block for every row, since those outputs need them."""
    heads = exits_of(model)
    wants_all = inputs.get("output_hidden_states") or inputs.get("output_attentions") or model.training
    if heads is None or not heads.enabled or wants_all:
        return full_forward(model, **inputs)
    labels = inputs.pop("labels", None)
    reference = inputs.get("input_ids")
    if reference is None:
        reference = inputs["inputs_embeds"]
    rows, device = reference.shape[0], reference.device
    mask = inputs.get("attention_mask")
    blocks = exit_blocks(model)
    active = torch.arange(rows, device=device)
    exit_at = torch.full((rows,), heads.blocks - 1, dtype=torch.long, device=device)
    logits: torch.Tensor | None = None
    track = ExitTrack()
    where = {p: i for i, p in enumerate(heads.positions)}

    def gather(value: Any) -> Any:
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows and active.numel() < rows:
            return value.index_select(0, active)
        return value

    def before(_module, args, kwargs):
        return (args[0], *(gather(a) for a in args[1:])), {k: gather(v) for k, v in kwargs.items()}

    def after(block_index: int):
        def hook(_module, _args, _kwargs, output):
            nonlocal active, logits
            hidden = output[0] if isinstance(output, tuple) else output
            scores = heads.heads[where[block_index]](hidden, None if mask is None else mask.index_select(0, active))
            if logits is None:
                logits = scores.new_zeros(rows, scores.shape[-1])
            leave = fires(heads.rule, scores, track, heads.regression)
            if not bool(leave.any()):
                return None
            logits[active[leave]] = scores[leave]
            exit_at[active[leave]] = block_index
            stay = (~leave).nonzero().squeeze(-1)
            active = active[stay]
            track.keep(stay)
            if active.numel() == 0:
                raise _AllExited
            kept = hidden.index_select(0, stay)
            return (kept, *output[1:]) if isinstance(output, tuple) else kept
        return hook

    handles = []
    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
            if index in where:
                handles.append(block.register_forward_hook(after(index), with_kwargs=True))
        try:
            output = full_forward(model, **inputs)
            final = output.logits
            if logits is None:
                logits = final.new_zeros(rows, final.shape[-1])
            logits[active] = final.to(logits.dtype)
        except _AllExited:
            output = None
    finally:
        for handle in handles:
            handle.remove()
    heads.last_exit = exit_at
    from transformers.modeling_outputs import SequenceClassifierOutput

    loss = None
    if labels is not None:
        loss = F.mse_loss(logits.squeeze(-1).float(), labels.float()) if heads.regression else \
            F.cross_entropy(logits.float(), labels)
    return SequenceClassifierOutput(loss=loss, logits=logits)


def all_exit_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every head's logits and the final logits for every row (one full pass): what training and the choice
    of a threshold need."""
    heads = exits_of(model)
    output = full_forward(model, **inputs, output_hidden_states=True)
    states = output.hidden_states   # [embeddings, block 0, block 1, ...]
    mask = inputs.get("attention_mask")
    return [head(states[p + 1], mask) for head, p in zip(heads.heads, heads.positions, strict=True)], output.logits


def simulate(rule: ExitRule, head_logits: list[torch.Tensor], final: torch.Tensor,
             regression: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(exit index per row: k for the k-th head, len(heads) for none; the logits each row ends with) of `rule`
    on precomputed logits: the same `fires` as the forward pass, so the choice of a threshold sees what the
    model will do."""
    rows = final.shape[0]
    chosen = torch.full((rows,), len(head_logits), dtype=torch.long)
    out = final.float().clone()
    track = ExitTrack()
    for k, logits in enumerate(head_logits):
        leave = fires(rule, logits, track, regression) & (chosen == len(head_logits))
        chosen[leave] = k
        out[leave] = logits.float()[leave]
    return chosen, out


def exit_costs(heads: ExitHeads, per_block: list[int], total: int) -> list[float]:
    """FLOPs of an example that leaves at the k-th head (k = len(heads): at none), as a fraction of the model
    without exits: the blocks it ran and the heads it consulted; the embeddings and final head count always."""
    rest = total - sum(per_block)
    head = heads.heads[0].flops() if len(heads.heads) else 0
    costs = [(rest + sum(per_block[:p + 1]) + (k + 1) * head) / total for k, p in enumerate(heads.positions)]
    return [*costs, (total + len(heads.heads) * head) / total]
