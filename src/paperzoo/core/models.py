"""Tiny language models, loading any Hugging Face causal LM, and the cached base models.

Every paper that needs "an LLM" gets one of two things: the user's own HF causal LM
(`load_causal_lm`, safetensors only, remote code only on an explicit flag), or a
base model that paperzoo trains from scratch on the embedded corpus the first time
it is asked for and caches (`base_model`). The cache key is a hash of everything
that determines the weights: model config, corpus, tokenizer, seed and steps.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from paperzoo.core import store
from paperzoo.core.corpus import Corpus, load_corpus
from paperzoo.core.tokenizer import train_tokenizer
from paperzoo.core.training import TrainConfig, token_blocks, train, training_device


class ModelLoadError(ValueError):
    """A model that cannot be used: missing, not a causal LM, unsafe weights."""


@dataclass(frozen=True)
class TinyLMConfig:
    """A Llama-style decoder: RMSNorm, rotary positions, SwiGLU, untied embeddings."""

    vocab_size: int = 4096
    hidden_size: int = 192
    num_layers: int = 12
    num_heads: int = 3
    intermediate_size: int = 512
    max_seq_len: int = 256

    def build(self) -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=self.max_seq_len,
            tie_word_embeddings=False,  # the under-trained token detector reads U on its own
            # No pad_token_id: it would freeze the EOS embedding at zero (nn.Embedding padding_idx).
            bos_token_id=0, eos_token_id=0,
        )
        return LlamaForCausalLM(config)


@dataclass(frozen=True)
class BaseModelSpec:
    model: TinyLMConfig
    train: TrainConfig
    seed: int = 0


# The default base model for each scale. `small` is what experiments run on by default:
# 12 layers (deep enough for layer pruning), widths divisible by 64 (the group size of the
# card's round-to-nearest figures), ~10 minutes on 2 cores.
#
# Its recipe (version 2, issue 10 B) was chosen on validation perplexity alone, in runs of
# an equal 150 s on 2 threads (seed 0, the embedded corpus): d=192 at lr 2e-3 (v1's
# recipe) 478, at lr 3e-3 456; d=128 with batches of 16 rows at lr 3e-3 301, at lr 5e-3
# 311; d=128 with batches of 8 rows at lr 3e-3 266. A narrower model sees 1.7x the tokens
# in the same time and smaller batches make more updates of them, which wins at this
# budget. The v1 recipe (d=192, 500 steps of 16 rows, lr 2e-3) reached 170 in 593 s.
BASE_MODELS = {
    "smoke": BaseModelSpec(
        TinyLMConfig(vocab_size=1024, hidden_size=32, num_layers=12, num_heads=2, intermediate_size=64, max_seq_len=64),
        TrainConfig(steps=30, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=0),
    ),
    "small": BaseModelSpec(
        TinyLMConfig(hidden_size=128, num_heads=2, intermediate_size=384),
        TrainConfig(steps=1400, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=100, eval_every=200),
    ),
    "large": BaseModelSpec(
        TinyLMConfig(vocab_size=8192, hidden_size=512, num_layers=16, num_heads=8, intermediate_size=1376, max_seq_len=512),
        TrainConfig(steps=5000, batch_size=32, seq_len=512, lr=1e-3, warmup_steps=200, eval_every=500),
    ),
}


@dataclass
class LanguageModel:
    """A causal LM with its tokenizer and the corpus that experiments read.

    `trained_here` is True for paperzoo's base models: their training data is
    exactly `corpus.train`, which some experiments use as ground truth.
    """

    name: str
    model: nn.Module
    tokenizer: object
    corpus: Corpus
    seq_len: int
    trained_here: bool = False
    record: dict = field(default_factory=dict)

    def blocks(self, split: str, seq_len: int | None = None) -> torch.Tensor:
        docs = self.corpus.train if split == "train" else self.corpus.validation
        return token_blocks(self.tokenizer, docs, seq_len or self.seq_len)


def base_model(scale: str = "small", corpus: str | None = None, seed: int = 0) -> LanguageModel:
    """The cached base LM for `scale`, trained here on first use (with a progress bar)."""
    spec = BASE_MODELS[scale]
    spec = BaseModelSpec(spec.model, spec.train, seed)
    data = load_corpus(corpus)
    tokenizer = train_tokenizer(data, spec.model.vocab_size)
    key = store.stable_hash(["base-v4", asdict(spec), data.fingerprint, tokenizer.backend_tokenizer.to_str()])
    path = store.home() / "models" / f"base-{scale}-{key}"

    def build(tmp: Path) -> None:
        from paperzoo.core import base_card

        # The bf16 peak, measured in this run, so the card's MFU means the same on any CPU (none on a GPU).
        peak = base_card.matmul_peak_flops() if training_device().type == "cpu" else None
        torch.manual_seed(seed)
        model = spec.model.build().to(training_device())
        val_blocks = token_blocks(tokenizer, data.validation, spec.train.seq_len)
        start = time.perf_counter()
        history = train(
            model, token_blocks(tokenizer, data.train, spec.train.seq_len), spec.train, val_blocks=val_blocks,
            desc=f"training the {scale} base LM (cached afterwards)", seed=seed,
        )
        record = {"scale": scale, "spec": asdict(spec), "corpus": data.name, "device": str(training_device()),
                  "train_seconds": time.perf_counter() - start, **history,
                  "card": base_card.card(model, val_blocks, history, scale, peak)}
        save_trained(tmp, model.cpu(), tokenizer, record)

    model, tokenizer, record = load_trained(store.cached_dir(path, build))
    return LanguageModel(f"paperzoo base-{scale} ({path.name})", model, tokenizer,
                         data, spec.train.seq_len, trained_here=True, record=record)


TRAINING_RECORD = "paperzoo-training.json"


def save_trained(directory: Path, model, tokenizer, record: dict) -> None:
    """A model paperzoo trained, its tokenizer, and the record of how (for a cache entry)."""
    hf_logging.disable_progress_bar()
    model.save_pretrained(directory)
    if tokenizer is not None:  # task models read token ids directly
        tokenizer.save_pretrained(directory)
    (directory / TRAINING_RECORD).write_text(json.dumps(record, indent=1))


def load_trained(directory: Path, model_class=LlamaForCausalLM, shared: bool = True):
    """(model in eval mode, tokenizer, training record) of a directory written by `save_trained`.

    Every load of a shared model is noted as substrate (see `substrate_used`), so a record
    names the cached models its verdict stood on; `shared=False` (an experiment's own
    task models) is not.
    """
    hf_logging.disable_progress_bar()
    directory = Path(directory)
    model = model_class.from_pretrained(directory, use_safetensors=True).eval()
    record = json.loads((directory / TRAINING_RECORD).read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").exists() else None
    if shared:
        note_substrate(directory.name, model, record)
    return model, tokenizer, record


_SUBSTRATE_LOG: list[list[dict]] = []


def model_card(name: str, model: nn.Module, record: dict) -> dict:
    """A short card of a cached model: its cache key, size, training cost and validation figures."""
    val = record.get("val") or []
    card = {"name": name, "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(record.get("train_seconds", 0.0), 1)}
    if val:
        card["validation"] = {k: v for k, v in val[-1].items() if isinstance(v, (int, float))}
    if record.get("card"):
        card.update(record["card"])
    return card


def note_substrate(name: str, model: nn.Module, record: dict) -> None:
    for log in _SUBSTRATE_LOG:
        if all(c["name"] != name for c in log):
            log.append(model_card(name, model, record))


@contextmanager
def substrate_used():
    """Collect the cards of every cached model loaded inside the block."""
    log: list[dict] = []
    _SUBSTRATE_LOG.append(log)
    try:
        yield log
    finally:
        _SUBSTRATE_LOG.remove(log)


def _looks_local(name: str) -> bool:
    """A path, not a hub id: it exists, starts like a path, has two slashes, or its first part is a local folder."""
    first = name.split("/", 1)[0]
    return (Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
            or ("/" in name and Path(first).is_dir()))


def _one_sentence(e: Exception) -> str:
    """The first sentence of a library's message, whole (messages that span lines are joined first)."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    end = text.find(". ")
    text = text if end < 0 else text[: end + 1]
    return text if len(text) <= 300 else text[:300] + "..."


def check_model_spec(name_or_path: str) -> None:
    """Cheap checks of a --model value before any work: a local path must be a model directory."""
    shown = name_or_path if len(name_or_path) <= 120 else name_or_path[:120] + f"... ({len(name_or_path)} characters)"
    if not name_or_path.strip():
        raise ModelLoadError("--model is empty")
    local = Path(name_or_path).expanduser()
    if _looks_local(name_or_path):
        if not local.is_dir():
            raise ModelLoadError(f"model directory not found: {shown}")
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{shown} has no config.json: not a Hugging Face model directory")


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False):
    """Load a HF causal LM and its tokenizer from a local directory or a hub name.

    Only safetensors weights are read (a pickle can run code), and remote code runs
    only when the caller says so.
    """
    check_model_spec(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        where = "" if _looks_local(name_or_path) else " (no local directory of that name either)"
        raise ModelLoadError(f"cannot read a model config from {name_or_path!r}{where}: {_one_sentence(e)}") from None
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    if not trust_remote_code and (config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                                  or (architectures and not causal_classes & set(architectures))):
        kind = architectures[0] if architectures else config.model_type
        raise ModelLoadError(f"{name_or_path!r} holds a {kind} checkpoint, not a causal LM")
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            name_or_path, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    except Exception as e:
        raise ModelLoadError(f"cannot load the weights of {name_or_path!r}: {_one_sentence(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception:
        raise ModelLoadError(f"{name_or_path!r} has no usable tokenizer (tokenizer.json or tokenizer_config.json "
                             "with its vocabulary); save one beside the weights") from None
    if info.get("missing_keys"):  # a randomly initialised head would give silently wrong results
        raise ModelLoadError(f"{name_or_path!r} lacks weights: {', '.join(sorted(info['missing_keys'])[:3])}")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 and others ship none; batching needs one (labels mask it)
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):  # token ids past the embedding table would fail deep inside a forward pass
        raise ModelLoadError(f"{name_or_path!r} embeds {rows} tokens but its tokenizer has {len(tokenizer)}; "
                             "they do not belong together")
    return model.eval(), tokenizer


# Where the stack of decoder blocks lives, by architecture family.
_LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "transformer.blocks")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted attribute path and the ModuleList of a causal LM's decoder blocks."""
    for dotted in _LAYER_PATHS:
        obj = model
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return dotted, obj
    raise ModelLoadError(f"{type(model).__name__} has no standard decoder-layer list ({', '.join(_LAYER_PATHS)})")
