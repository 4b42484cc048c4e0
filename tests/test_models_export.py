"""`inferq models export` and `verify`: a configured model written for a host without internet, loaded from the
exported folder offline, gives what the original gives; a changed or incomplete copy does not verify."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from producer.settings import ModelEntry, Settings
from tests.conftest import write_config
from workers.models.classify import SequenceClassifier
from workers.models.embed import PooledEmbedder
from workers.models.export import MANIFEST, ExportError, export, verify
from workers.models.generate import CausalGenerator

CPU = torch.device("cpu")
TEXTS = ["the movie was wonderful", "a dull, grey afternoon", "Grüße aus Köln 🎉"]


def _offline(folder: Path, like: ModelEntry) -> ModelEntry:
    return like.model_copy(update={"source": str(folder), "gguf_file": None, "revision": None})


def test_an_exported_embedder_and_classifier_give_the_same_outputs(tmp_path: Path,
                                                                    tiny_models: dict[str, Path]) -> None:
    minilm = Settings().models.embed["minilm"]  # the packaged MiniLM: a real tokenizer and real weights
    manifest = export("embed", "minilm", minilm, tmp_path / "minilm")
    assert manifest["kind"] == "embed" and "model.safetensors" in manifest["files"]
    assert verify(tmp_path / "minilm")[1] == []
    original = PooledEmbedder.load("minilm", minilm, CPU)
    copy = PooledEmbedder.load("minilm", _offline(tmp_path / "minilm", minilm), CPU)
    assert original.tokenize(TEXTS) == copy.tokenize(TEXTS)
    assert torch.equal(original.embed(TEXTS, normalize=True), copy.embed(TEXTS, normalize=True))

    tiny = ModelEntry(source=str(tiny_models["classifier"]), max_length=64)
    export("classify", "tiny-sentiment", tiny, tmp_path / "tiny-sentiment")
    classifier = SequenceClassifier.load("tiny-sentiment", tiny, CPU)
    exported = SequenceClassifier.load("tiny-sentiment", _offline(tmp_path / "tiny-sentiment", tiny), CPU)
    assert classifier.labels == exported.labels
    ids = classifier.tokenize(TEXTS)
    assert torch.equal(classifier.probabilities(ids, 16, 4096), exported.probabilities(ids, 16, 4096))


def test_an_exported_generator_gives_the_same_greedy_text(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    entry = ModelEntry(source=str(tiny_models["lm"]), max_length=128)
    export("generate", "tiny-lm", entry, tmp_path / "tiny-lm")
    original = CausalGenerator.load("tiny-lm", entry, CPU).loaded
    copy = CausalGenerator.load("tiny-lm", _offline(tmp_path / "tiny-lm", entry), CPU).loaded
    prompt = torch.tensor([original.encoder.encode("counting: 1, 2, 3,").ids])
    with torch.inference_mode():
        greedy = [loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                        do_sample=False, pad_token_id=0)[0].tolist() for loaded in (original, copy)]
    assert greedy[0] == greedy[1] and len(greedy[0]) > prompt.shape[1]
    assert copy.generation_config.eos_token_id == original.generation_config.eos_token_id


def test_an_exported_gguf_model_is_unpacked_and_gives_the_same_greedy_text(tmp_path: Path) -> None:
    """SmolLM2 ships as a Q4_1 GGUF file, which a worker serves with its weights kept in GGUF blocks; those
    cannot be saved, so the export unpacks them. The copy must still write what the worker writes."""
    entry = Settings().models.generate["smollm2"]
    assert entry.gguf_file, "the packaged SmolLM2 is a GGUF checkpoint: this test is about that path"
    export("generate", "smollm2", entry, tmp_path / "smollm2")
    assert verify(tmp_path / "smollm2")[1] == []
    served = CausalGenerator.load("smollm2", entry, CPU).loaded  # as a worker loads it: packed
    copy = CausalGenerator.load("smollm2", _offline(tmp_path / "smollm2", entry), CPU).loaded
    for text in ("The capital of France is", "def fibonacci(n):"):
        prompt = torch.tensor([served.encoder.encode(text).ids])
        with torch.inference_mode():
            greedy = [loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                            do_sample=False, pad_token_id=0)[0].tolist() for loaded in (served, copy)]
        assert greedy[0] == greedy[1] and len(greedy[0]) > prompt.shape[1], (text, greedy)


def test_the_cli_exports_verifies_and_catches_a_changed_copy(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    config = write_config(tmp_path / "inferq.toml", tiny_models)
    env = {**os.environ, "INFERQ_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}
    target = tmp_path / "out"

    def inferq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer.cli", "models", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    done = inferq("export", "tiny-sentiment", str(target))
    assert done.returncode == 0, done.stderr
    assert f'source = "{target.resolve()}"' in done.stdout and "max_length = 64" in done.stdout
    assert inferq("verify", str(target)).returncode == 0
    again = inferq("export", "tiny-sentiment", str(target))
    assert again.returncode == 1 and "not an empty folder" in again.stderr
    unknown = inferq("export", "nope", str(tmp_path / "other"))
    assert unknown.returncode == 2 and "names no configured model" in unknown.stderr

    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # a copy cut short
    (target / "extra.bin").write_bytes(b"?")
    failed = inferq("verify", str(target))
    assert failed.returncode == 1
    assert "model.safetensors: sha256 differs" in failed.stderr and "extra.bin: not in the manifest" in failed.stderr
    (target / MANIFEST).unlink()
    with pytest.raises(ExportError, match=r"no inferq-manifest\.json"):
        verify(target)
