"""`DAN`: a Deep Averaging Network over n-gram ids (the sparse-distillation student): an `EmbeddingBag` that averages
the row's n-gram vectors (padding id 0 left out), then `layers` hidden layers, then the classes (or one score).

It takes the same batch a transformer classifier takes (`input_ids`, `attention_mask`) and returns an output with
`.logits`, so evaluation, timing and the sweep treat it like any model; `kernels.ngrams.NgramFeaturizer` is its
tokenizer. `config` carries what callers read of a Hugging Face config (labels, problem type, vocab size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


@dataclass
class DANConfig:
    vocab_size: int
    dim: int = 256
    hidden: int = 256
    layers: int = 2
    num_labels: int = 2
    id2label: dict[int, str] = field(default_factory=dict)
    problem_type: str | None = None
    dropout: float = 0.1
    model_type: str = "dan"
    is_encoder_decoder: bool = False

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return data

    def save_pretrained(self, directory: Any) -> None:
        """Hugging Face-like: `config.json` (read by model-directory checks and written beside exports)."""
        import json
        from pathlib import Path

        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DANConfig:
        data = dict(data)
        data["id2label"] = {int(k): str(v) for k, v in data.get("id2label", {}).items()}
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DAN config fields {sorted(unknown)}")
        return cls(**data)


class DAN(nn.Module):
    def __init__(self, config: DANConfig, featurizer: Any = None) -> None:
        super().__init__()
        self.config, self.featurizer = config, featurizer
        self.embedding = nn.EmbeddingBag(config.vocab_size, config.dim, mode="mean", sparse=True, padding_idx=0)
        sizes = [config.dim] + [config.hidden] * config.layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(sizes[-1], config.num_labels)
        nn.init.normal_(self.embedding.weight, std=0.1)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    @property
    def features_per_token(self) -> int:
        """n-gram ids per word (timing feeds this many ids per token of its dummy batch)."""
        return getattr(self.featurizer, "features_per_word", 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: Any) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.classifier(self.represent(input_ids)))

    def represent(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text's vector before the classifier (what a representation target in training pulls on)."""
        if isinstance(self.embedding, nn.EmbeddingBag) and not _exporting():
            x = self.embedding(input_ids)   # fused gather and mean, padding (id 0) left out
        else:   # the same mean as a gather and a sum: under ONNX export, or an int8 table (`quantize`)
            rows = F.embedding(input_ids, self.embedding.weight) if isinstance(self.embedding, nn.EmbeddingBag) \
                else self.embedding(input_ids)
            keep = (input_ids != 0).unsqueeze(-1).to(rows.dtype)
            x = rows.mul(keep).sum(1) / keep.sum(1).clamp(min=1)
        for layer in self.hidden:
            x = self.dropout(torch.relu(layer(x)))
        return x


def _exporting() -> bool:
    try:
        return bool(torch.onnx.is_in_onnx_export()) or bool(torch.compiler.is_exporting())
    except AttributeError:
        return False
