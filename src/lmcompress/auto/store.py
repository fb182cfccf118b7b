"""The best valid model so far, always complete on disk under OUT (anytime): whatever stops the search,
`OUT/model` loads.

Each new best is saved with `lmcompress.save` (a temporary sibling directory renamed into place when complete)
as `OUT/models/<n>`; then a new symbolic link is renamed over `OUT/model` (rename is atomic on POSIX, so the
link names the old model or the new one, never neither), then `OUT/best.json` is rewritten the same way, and
only then is the previous model deleted. The distillation checkpoints use the same scheme.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

MODEL_LINK = "model"
MODELS_DIR = "models"
BEST_NAME = "best.json"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling of `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class BestStore:
    """Saves each new best valid model and switches `OUT/model` to it atomically."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.count = 0
        self.current: Path | None = None
        self.info: dict[str, Any] | None = None

    @property
    def link(self) -> Path:
        return self.out / MODEL_LINK

    def put(self, model: nn.Module, tokenizer: Any, recipe: Any, info: dict[str, Any]) -> Path:
        from lmcompress.io.saving import save

        self.count += 1
        target = self.out / MODELS_DIR / f"{self.count:03d}"
        save(model, target, tokenizer, recipe, overwrite=True, extra={"auto": info})
        tmp_link = self.out / f".{MODEL_LINK}.tmp-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(Path(MODELS_DIR) / target.name, target_is_directory=True)
        os.replace(tmp_link, self.link)
        write_atomic(self.out / BEST_NAME, json.dumps({**info, "path": str(Path(MODELS_DIR) / target.name)},
                                                      indent=2))
        previous, self.current, self.info = self.current, target, info
        if previous is not None and previous != target:
            shutil.rmtree(previous, ignore_errors=True)
        return target
