"""Configs of well-known models, shipped so `lmcompress anatomy NAME` works offline; and where a config comes from.

Each JSON file holds a model's published hyperparameters, with `architectures` naming the class its released
checkpoint was saved as (so heads it carries are counted). `PUBLISHED` holds each model's published parameter
count and its source, checked by the tests and printed beside ours in docs/benchmarks/anatomy.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmcompress.errors import ModelLoadError, first_line

CONFIG_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Published:
    """A published parameter count. `tolerance` is 1% unless the quote is rounded more coarsely than that (say
    1.2B: two significant figures, ±4%), where ours must round to the quote; `note` says which and why."""

    params: float
    source: str
    tolerance: float = 0.01
    note: str = ""


_HUB = "Hugging Face Hub model page (parameter count of the checkpoint's tensors)"
PUBLISHED: dict[str, Published] = {
    "bert-base-uncased": Published(110e6, "Devlin et al. 2019, BERT paper, BERT-Base"),
    "roberta-base": Published(125e6, "fairseq RoBERTa README (Liu et al. 2019)"),
    "roberta-large": Published(355e6, "fairseq RoBERTa README (Liu et al. 2019)"),
    "xlm-roberta-base": Published(279e6, _HUB, note="we count what XLMRobertaForMaskedLM holds, 278.3M; the Hub's "
                                  "279M is that plus, most likely, the pooler the checkpoint carries unused (0.59M): "
                                  "278.9M. Conneau et al. 2020 quote 270M, 3% below what the architecture holds: its "
                                  "embeddings alone are 250,002 x 768 = 192.0M and its 12 layers 85.1M"),
    "xlm-roberta-large": Published(561e6, _HUB, note="as for base: 560.1M, or 561.2M with the unused pooler (1.05M); "
                                   "Conneau et al. 2020 quote 550M, 2% low"),
    "t5-small": Published(60e6, "Raffel et al. 2020, T5 paper"),
    "t5-base": Published(220e6, "Raffel et al. 2020, T5 paper", 5e6 / 220e6,
                         note="two significant figures (±2.3%): ours must round to 220M"),
    "t5-large": Published(737_668_096, "released checkpoint's trainable variables, logged in "
                          "google-research/text-to-text-transfer-transformer issue #326",
                          note="the T5 paper's 770M is 4% high; its author calls it a likely typo in that issue"),
    "t5-3b": Published(2.85e9, "Raffel et al. 2020 quote 3B; 2.85B: " + _HUB),
    "t5-11b": Published(11e9, "Raffel et al. 2020, T5 paper", 0.5e9 / 11e9,
                        note="two significant figures (±4.5%): ours must round to 11B"),
    "mt5-base": Published(580e6, "Xue et al. 2021, mT5 paper"),
    "mt5-large": Published(1.2e9, "Xue et al. 2021, mT5 paper", 0.05e9 / 1.2e9,
                           note="two significant figures (±4.2%): ours must round to 1.2B"),
    "all-MiniLM-L6-v2": Published(22.7e6, "sentence-transformers/all-MiniLM-L6-v2 on the Hugging Face Hub",
                                  note="the bundled checkpoint holds exactly what we count (tested)"),
}


def shipped_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def read_config_dict(spec: str) -> tuple[dict, str]:
    """(config dict, where it came from) for a model directory, a config JSON file or a shipped config's name.

    A path that exists wins over a shipped name, so a local directory called `t5-small` is read, not ours."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{spec} has no config.json")
    elif not path.is_file():
        if (CONFIG_DIR / f"{spec}.json").is_file():
            path = CONFIG_DIR / f"{spec}.json"
        else:
            raise ModelLoadError(f"{spec}: no such model directory, config file or shipped config "
                                 f"(shipped: {', '.join(shipped_names())})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} is not a JSON config: {first_line(err)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelLoadError(f'{path} is not a model config (it has no "model_type")')
    return data, str(path)
