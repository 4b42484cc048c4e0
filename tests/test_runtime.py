"""The worker runtime in-process, with the real MiniLM: what a worker without a classifier answers."""

from __future__ import annotations

import pytest

from producer.errors import InvalidInput, UnknownModel
from producer.settings import ModelRegistry, Settings
from tests.conftest import ROOT
from workers.device.runtime import Runtime


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    # embed + classify only, no sequence-classification checkpoint: zero-shot is the only way to classify
    registry = ModelRegistry(classify={}, generate={})
    runtime = Runtime(Settings(models=registry, device="cpu"), ("embed", "classify"))
    runtime.load()
    return runtime


def test_only_the_needed_models_load(runtime: Runtime) -> None:
    status = runtime.describe()
    assert status["ready"] is True
    assert status["load_counts"] == {"embed/minilm": 1}
    assert status["models"]["generate"] == {}


def test_classify_without_labels_and_without_a_classifier_says_both_ways_out(runtime: Runtime) -> None:
    with pytest.raises(InvalidInput, match=r"no sequence-classification model is configured on this worker: pass "
                                           r"labels to classify zero-shot, or configure one under models\.classify"):
        runtime.handle("classify", (), {"texts": ["hello"]})


def test_a_kind_this_worker_does_not_serve_is_an_unknown_model(runtime: Runtime) -> None:
    with pytest.raises(UnknownModel, match="available: none configured"):
        runtime.handle("generate", (), {"prompt": "hi"})


def test_label_template_is_applied(runtime: Runtime) -> None:
    plain = runtime.handle("classify", (), {"texts": ["I loved it"], "labels": ["positive", "negative"], "top_k": 2})
    templated_settings = Settings(models=ModelRegistry(classify={}, generate={}), device="cpu",
                                  classify_label_template="This review is {}.")
    templated = Runtime(templated_settings, ("classify",))
    templated.load()
    result = templated.handle("classify", (), {"texts": ["I loved it"], "labels": ["positive", "negative"],
                                                "top_k": 2})
    assert result["results"][0][0]["label"] == "positive"  # type: ignore[typeddict-item]
    assert result != plain  # the template changed the label texts, hence the scores


# The README's zero-shot examples and the two a new user found wrong; each must say what it shows.
README_CLASSIFY = [
    ("The striker scored twice.", ["sports", "finance", "cooking"], "sports"),
    ("I loved it", ["positive review", "negative review"], "positive review"),
    ("awful", ["positive review", "negative review"], "negative review"),
    ("Terrible service, never again", ["positive review", "negative review"], "negative review"),
]


def test_the_readme_classify_examples_come_out_right_with_the_defaults(runtime: Runtime) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for shown in ('"The striker scored twice." --labels sports,finance,cooking',
                  '"I loved it"\\n{"texts": ["awful"], "top_k": 2}\\n\' | inferq classify --file - --labels '
                  '"positive review,negative review"',
                  'client.classify(["I loved it"], labels=["positive review", "negative review"]'):
        assert shown in readme  # the examples tested here are the README's own
    for text, labels, expected in README_CLASSIFY:
        result = runtime.handle("classify", (), {"texts": [text], "labels": labels, "top_k": 1})
        assert result["results"][0][0]["label"] == expected, (text, result)  # type: ignore[typeddict-item]
