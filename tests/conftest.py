"""Shared fixtures: tiny randomly initialised models built from configs (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # tests must never try the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):         # one worker per core already: more threads would fight them
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]         # the project root
SHARED_DATA = REPO.parent / "shared" / "data"

SENTENCES = [
    "the film was wonderful and the acting superb",
    "a dull, lifeless plot with no surprises at all",
    "i would not watch this again",
    "surprisingly good, although the ending drags",
    "the soup was cold but the service was friendly",
    "an absolute masterpiece of modern cinema",
    "terrible sound, terrible picture, terrible everything",
    "it is fine, nothing more",
    "never have i been so bored in a theatre",
    "the battery lasts for days and charges quickly",
    "broke after a week; support never answered",
    "not bad at all for the price",
]


@pytest.fixture(scope="session")
def tokenizer():
    from lmcompress.io.models import bundled_model_path, load_tokenizer

    return load_tokenizer(str(bundled_model_path()))


def make_tiny_bert(vocab_size: int, num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def make_tiny_gpt2(vocab_size: int, pad_token_id: int, seed: int = 0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128, num_labels=2,
                        pad_token_id=pad_token_id, bos_token_id=0, eos_token_id=0)
    return GPT2ForSequenceClassification(config).eval()


@pytest.fixture
def tiny_bert(tokenizer):
    return make_tiny_bert(tokenizer.vocab_size)


@pytest.fixture
def tiny_gpt2(tokenizer):
    return make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id)


@pytest.fixture(params=["bert", "gpt2"])
def tiny_model(request, tokenizer):
    if request.param == "bert":
        return make_tiny_bert(tokenizer.vocab_size)
    return make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id)


@pytest.fixture
def examples():
    from lmcompress.tasks import Examples

    return Examples(texts=SENTENCES, text_pairs=None, labels=[i % 2 for i in range(len(SENTENCES))],
                    label_names=("negative", "positive"))


def logits(model, tokenizer, texts=SENTENCES):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits


def make_tiny_llama(vocab_size: int, pad_token_id: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_labels=2,
                         pad_token_id=pad_token_id)
    return LlamaForSequenceClassification(config).eval()


def make_tiny_distilbert(vocab_size: int, seed: int = 0):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=vocab_size, dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                              max_position_embeddings=128, num_labels=2)
    return DistilBertForSequenceClassification(config).eval()


@pytest.fixture(params=["bert", "gpt2", "llama", "distilbert"])
def any_family_model(request, tokenizer):
    """One tiny model of each architecture family the anatomy knows."""
    makers = {"bert": lambda: make_tiny_bert(tokenizer.vocab_size),
              "gpt2": lambda: make_tiny_gpt2(tokenizer.vocab_size, tokenizer.pad_token_id),
              "llama": lambda: make_tiny_llama(tokenizer.vocab_size, tokenizer.pad_token_id),
              "distilbert": lambda: make_tiny_distilbert(tokenizer.vocab_size)}
    return makers[request.param]()


def save_classifier(model, tokenizer, path: Path) -> Path:
    """Save a tiny two-class (neg/pos) classifier and its tokenizer as a model directory the CLI can load."""
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_sentiment_csv(path: Path, texts) -> Path:
    """A text,label CSV alternating neg/pos labels over `texts`."""
    rows = ["text,label"] + [f'"{s}",{"pos" if i % 2 else "neg"}' for i, s in enumerate(texts)]
    path.write_text("\n".join(rows) + "\n")
    return path


def largest_tensor_during(fn, *args) -> int:
    """Elements in the largest tensor any operator produces while `fn(*args)` runs (inputs excluded): checks
    that a structured layer never rebuilds its dense (out x in) matrix in `forward`."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    largest = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            largest[0] = max([largest[0], *sizes])
            return out

    with torch.no_grad(), Watch():
        fn(*args)
    return largest[0]


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose energy sits in a few directions, as activations inside transformers do."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=generator) * torch.logspace(0, -3, dim)[None, :]
    return torch.randn(n, dim, generator=generator) @ mix.T


def stats_of(x: torch.Tensor):
    """Calibration statistics (X^T X and the token count) of the rows of x."""
    from lmcompress.calibration.stats import LayerStats

    x = x.to(torch.float64)
    return LayerStats(gram=x.T @ x, count=x.shape[0])


# running text and a tiny causal LM, for the language-modeling tests (perplexity, sweeps)
TEXT = ("the film was wonderful and the acting superb, although the ending drags a little.\n"
        "the soup was cold but the service was friendly, and the bread was fresh.\n"
        "never have i been so bored in a theatre; the battery lasts for days and charges quickly.")


def tiny_gpt2_lm(tokenizer, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def one_thread():
    """Tiny matrices: thread hand-offs cost more than the arithmetic (and other jobs share the cores). Files of
    tiny-model tests use it for every test: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
