"""lmcompress: data-aware, post-hoc compression of fine-tuned transformer language models.

    import lmcompress as lmc
    model, tokenizer = lmc.load_model("path/to/finetuned")
    task = lmc.get_task("sst2")
    train = lmc.load_examples(task, "glue/SST-2", "train")
    summary = lmc.compress(model, lmc.Recipe.single("whitened_svd", keep=0.5), tokenizer, train)
    lmc.save(model, "compressed", tokenizer, recipe)
    same = lmc.load("compressed")

Names are imported lazily so `import lmcompress` (and the CLI's --help) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from lmcompress.core.onednn import size_kernel_cache

__version__ = "0.1.0"
size_kernel_cache()   # before any bfloat16 product runs (core/onednn.py says why)

_EXPORTS = {
    "finetune": "lmcompress.training.finetune",
    "FinetuneConfig": "lmcompress.training.finetune",
    "distill_dan": "lmcompress.training.dan",
    "label_augmented": "lmcompress.training.dan",
    "DANOptions": "lmcompress.training.dan",
    "compress": "lmcompress.engine.pipeline",
    "CompressionSummary": "lmcompress.engine.pipeline",
    "evaluate": "lmcompress.evaluation",
    "EvalResult": "lmcompress.evaluation",
    "load": "lmcompress.io.saving",
    "save": "lmcompress.io.saving",
    "save_dense": "lmcompress.io.saving",
    "export_hf": "lmcompress.io.hf_export",
    "load_model": "lmcompress.io.models",
    "Recipe": "lmcompress.engine.recipe",
    "Stage": "lmcompress.engine.recipe",
    "get_task": "lmcompress.tasks",
    "load_examples": "lmcompress.tasks",
    "available_methods": "lmcompress.methods",
    "LMCompressError": "lmcompress.errors",
    "AutoArgs": "lmcompress.auto.entry",
    "run_auto": "lmcompress.auto.entry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmcompress' has no attribute {name!r}")
