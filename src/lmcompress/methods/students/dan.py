"""`dan`: a recipe stage that replaces the whole model by a DAN student over n-grams (`training.dan`, sparse
distillation), trained on the stage's texts towards the model as it was before the recipe ran.

The student is a new model, not an edit of this one: it comes back as `ModelResult.model` (with its n-gram
featurizer as the tokenizer), later stages act on it (`quantize`, say) and the caller saves it. It must be the
first stage, since the teacher is the model as the recipe found it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmcompress.errors import DataError
from lmcompress.methods.base import Method, MethodConfig, ModelResult, StageContext, register_method
from lmcompress.training.dan import DANOptions


class DANStageConfig(DANOptions, MethodConfig):
    """`DANOptions`, the options of `lmcompress distill --student dan`, as a stage's options."""


@register_method
class Dan(Method):
    name = "dan"
    config_class = DANStageConfig
    unit = "model"
    budget_metrics = ()         # sized by its own options (table, dim, hidden)
    keeps_data_content = True   # a student of the embedded demo texts would be a silent mistake
    replaces_model = True

    def needs_for(self, config: DANStageConfig) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"labels"}) if config.label_epochs else frozenset()

    def uses_data(self, config: DANStageConfig) -> bool:  # type: ignore[override]
        return True

    def wants_original(self, config: DANStageConfig) -> bool:  # type: ignore[override]
        return False   # it is always the first stage, so the model it gets is the original: no copy needed

    def compress_model(self, model: nn.Module, tokenizer: Any, data: Any, config: DANStageConfig,  # type: ignore[override]
                       targets: dict[str, nn.Module], context: StageContext | None = None) -> ModelResult:
        from lmcompress.training.dan import distill_dan

        context = context or StageContext()
        teacher = model   # the recipe's first stage (Recipe.check refuses it later): the model as the recipe found it
        if getattr(data, "text_pairs", None) is not None:
            raise DataError("a DAN student takes single-text tasks; this task's examples are text pairs")
        options = DANOptions(**config.model_dump(include=set(DANOptions.model_fields)))
        labels = data.labels if options.label_epochs else None
        with torch.enable_grad():   # the pipeline runs stages under no_grad
            result = distill_dan(teacher, tokenizer, list(data.texts), labels, options=options,
                                 progress=context.progress)
        before, report = sum(p.numel() for p in teacher.parameters()), result.report
        report["params_before"] = before
        report["summary"] = (f"replaced the {type(teacher).__name__} ({before:,} parameters) by a DAN student "
                             f"({report['params']:,} parameters, {report['vocabulary']:,} n-grams) trained on "
                             f"{report['texts']} texts in {report['seconds']}s")
        student = result.model.to(next(teacher.parameters()).device)   # trained on the CPU; kept where the model was
        return ModelResult([], student.featurizer, report, model=student)
