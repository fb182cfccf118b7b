"""Where the parameters of every shipped config live, beside each model's published size.

    python benchmarks/anatomy_table.py            # -> docs/benchmarks/anatomy.md

Counts come from `lmcompress anatomy` (models built on the meta device from src/lmcompress/core/configs/, nothing
downloaded); published counts and their sources from `lmcompress.core.configs.PUBLISHED`. Takes a few seconds.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import transformers

from lmcompress.core.configs import PUBLISHED, shipped_names
from lmcompress.evaluation.anatomy import anatomy

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python benchmarks/anatomy_table.py"


def _share(count: int, total: int) -> str:
    return f"{count / 1e6:,.1f} ({100 * count / total:.1f}%)"


def _published(count: float) -> str:
    short = f"{count / 1e9:g}B" if count >= 1e9 else f"{count / 1e6:g}M"
    return short if len(short) <= 6 else f"{int(count):,}"  # an exact count is shown whole


def table(seq_len: int) -> str:
    rows = ["| model | type | total (M) | embeddings M (%) | attention M (%) | feed-forward M (%) "
            f"| norms + other M (%) | GFLOPs @ {seq_len} | published | difference |", "|---" * 10 + "|"]
    notes = []
    for name in PUBLISHED:  # by family, smallest first
        result, published = anatomy(name, seq_len), PUBLISHED[name]
        p = result.params
        total = p["total"]
        difference = 100 * (total - published.params) / published.params
        mark = ""
        if published.note:
            notes.append(f"{name}: {published.note}.")
            mark = f" [{len(notes)}]"
        rows.append(f"| {name} | {result.architecture} | {total / 1e6:,.1f} | {_share(p['embeddings'], total)} | "
                    f"{_share(p['attention'], total)} | {_share(p['feed_forward'], total)} | "
                    f"{_share(p['norms'] + p['other'], total)} | {result.flops / 1e9:,.1f} | "
                    f"{_published(published.params)}{mark} | {difference:+.2f}% |")
    sources = [f"- {name}: {published.source}" for name, published in PUBLISHED.items()]
    return "\n".join([*rows, "", *(f"- [{i}] {note}" for i, note in enumerate(notes, 1)), "", "Sources:", "",
                      *sources])


def main() -> None:
    assert sorted(PUBLISHED) == shipped_names(), "every shipped config needs a published count"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "anatomy.md")
    args = parser.parse_args()
    header = f"""# Where the parameters live: shipped configs

Made by `{COMMAND}` on {date.today().isoformat()} (transformers {transformers.__version__}); one row per
`lmcompress anatomy NAME`. Each model is built from its config on the meta device, as the class its checkpoint
was saved as (so a masked-LM head is counted); tied input and output embeddings count once; an untied LM head
(mT5) counts as embeddings. Norms + other: layer norms, poolers and heads outside the blocks. GFLOPs: one
sequence of {args.seq_len} tokens (encoder-decoders: in and out), dense layers and attention products only, the
projection onto the vocabulary included. Difference: ours against the published figure. See
[docs/anatomy.md](../anatomy.md) for what is counted.

"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + table(args.seq_len) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
