"""Unit tests of the public contract's validation: every class of bad input gets a typed, clear message."""

from __future__ import annotations

import re
from typing import Any

import pytest

from producer.contract import ClassifyRequest, EmbedRequest, GenerateRequest, validate
from producer.errors import InputTooLarge, InvalidInput
from producer.settings import Limits

LIMITS = Limits(max_texts=4, max_chars=50, max_labels=3, max_new_tokens=100, max_stop=2, max_messages=3)


def reject(kind: str, kwargs: Any, error: type[Exception] = InvalidInput, args: Any = ()) -> str:
    with pytest.raises(error) as caught:
        validate(kind, kwargs, LIMITS, args)  # type: ignore[arg-type]
    return str(caught.value)


def test_good_requests_pass_with_defaults() -> None:
    embed = validate("embed", {"texts": ["a", "b"]}, LIMITS)
    assert embed == EmbedRequest(texts=["a", "b"], normalize=True, model=None)
    classify = validate("classify", {"texts": ["a"], "labels": ["x", "y"], "top_k": 5}, LIMITS)
    assert isinstance(classify, ClassifyRequest) and classify.top_k == 5  # capped later, by the label count
    generate = validate("generate", {"messages": [{"role": "user", "content": "hi"}], "seed": 3}, LIMITS)
    assert isinstance(generate, GenerateRequest)
    assert (generate.max_new_tokens, generate.temperature, generate.top_p) == (64, 0.0, 1.0)
    # JSON numbers: an integer is a fine temperature
    assert validate("generate", {"prompt": "x", "temperature": 1}, LIMITS).temperature == 1.0  # type: ignore[union-attr]
    # private-use characters, and ones newer than this Python's Unicode data, are visible (an emoji of 2022)
    assert validate("embed", {"texts": ["\ue000", "\U0001fae8"]}, LIMITS)
    # null is an argument's default, whichever argument it is
    assert validate("embed", {"texts": ["a"], "normalize": None, "model": None}, LIMITS) == \
        EmbedRequest(texts=["a"], normalize=True, model=None)
    nulls = validate("generate", {"prompt": "x", "messages": None, "max_new_tokens": None, "temperature": None,
                                  "top_p": None, "stop": None, "seed": None, "stream": None}, LIMITS)
    assert nulls == validate("generate", {"prompt": "x"}, LIMITS)
    assert validate("classify", {"texts": ["a"], "top_k": None, "labels": None}, LIMITS) == \
        validate("classify", {"texts": ["a"]}, LIMITS)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"texts": ["a", "b", "c", 4]}, "texts[3] must be a string; got int"),
    ({"texts": []}, "texts must be a non-empty list of strings; got []"),
    ({"texts": "just one"}, "texts must be a non-empty list of strings; got string 'just one'"),
    ({}, "texts is required"),
    ({"texts": ["ok", ""]}, "texts[1] is an empty string"),
    ({"texts": ["ok", " \n\t"]}, "texts[1] has only whitespace or invisible characters"),
    ({"texts": ["\u200b"]}, "texts[0] has only whitespace or invisible characters"),  # a zero-width space
    ({"texts": ["ok", "\x00\ufeff "]}, "texts[1] has only whitespace or invisible characters"),
    ({"texts": [["nested"]]}, "texts[0] must be a string; got list"),
    ({"texts": ["x"], "normalize": 1}, "normalize must be true or false; got int"),
    ({"texts": ["x"], "normalize": "yes"}, "normalize must be true or false; got string 'yes'"),
    ({"texts": ["x"], "model": 7}, "model must be a model alias"),
    ({"texts": ["x"], "model": ""}, "model must be the alias of a configured model"),
    ({"texts": ["x"], "truncate": True},
     "unknown argument(s) 'truncate' for inferq.embed; allowed: model, texts, normalize"),
])
def test_embed_bad_input_says_what_and_where(kwargs: dict[str, Any], expected: str) -> None:
    assert expected in reject("embed", kwargs)


def test_positional_arguments_and_non_object_kwargs_are_refused() -> None:
    assert "keyword arguments only; got 1 positional" in reject("embed", {}, args=(["x"],))
    assert "kwargs must be an object; got list" in reject("embed", ["x"])


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"texts": ["a"] * 5}, "texts has 5 items; at most 4 are allowed"),
    ({"texts": ["a", "y" * 51]}, "texts[1] has 51 characters; at most 50 are allowed"),
])
def test_limits_raise_input_too_large(kwargs: dict[str, Any], expected: str) -> None:
    assert expected in reject("embed", kwargs, InputTooLarge)


@pytest.mark.parametrize(("kwargs", "error", "expected"), [
    ({"texts": ["a"], "labels": []}, InvalidInput, "labels must be a non-empty list"),
    ({"texts": ["a"], "labels": ["x", "x"]}, InvalidInput, "labels[1] repeats labels[0] ('x', spaces aside)"),
    ({"texts": ["a"], "labels": ["y", "x", " x "]}, InvalidInput, "labels[2] repeats labels[1]"),
    ({"texts": ["a"], "labels": ["x", "\u200b"]}, InvalidInput, "labels[1] has no visible characters"),
    ({"texts": ["a"], "labels": ["x", " "]}, InvalidInput, "labels[1] has no visible characters"),
    ({"texts": ["a"], "labels": ["a", "b", "c", "d"]}, InputTooLarge, "labels has 4 items; at most 3"),
    ({"texts": ["a"], "top_k": 0}, InvalidInput, "top_k must be an integer >= 1; got 0"),
    ({"texts": ["a"], "top_k": 1.5}, InvalidInput, "top_k must be an integer >= 1; got float"),
    ({"texts": ["a"], "top_k": True}, InvalidInput, "top_k must be an integer >= 1; got bool"),
])
def test_classify_bad_input(kwargs: dict[str, Any], error: type[Exception], expected: str) -> None:
    assert expected in reject("classify", kwargs, error)


@pytest.mark.parametrize(("kwargs", "error", "expected"), [
    ({}, InvalidInput, "exactly one of prompt (a string) or messages (a chat list); got neither"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, InvalidInput, "got both"),
    ({"prompt": ""}, InvalidInput, "prompt is an empty string"),
    ({"prompt": 5}, InvalidInput, "prompt must be a string; got int"),
    ({"messages": []}, InvalidInput, "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, InvalidInput,
     "messages[0].role must be 'system', 'user' or 'assistant'; got string 'robot'"),
    ({"messages": [{"role": "user"}]}, InvalidInput, "messages[0].content is required"),
    ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, InvalidInput, "messages[0].name is not a known"),
    ({"messages": ["hello"]}, InvalidInput, "messages[0] must be an object; got string 'hello'"),
    ({"messages": [{"role": "user", "content": "x"}] * 4}, InputTooLarge, "messages has 4 items; at most 3"),
    ({"prompt": "x", "max_new_tokens": 0}, InvalidInput, "max_new_tokens must be an integer >= 1; got 0"),
    ({"prompt": "x", "max_new_tokens": 101}, InputTooLarge, "max_new_tokens is 101; at most 100"),
    ({"prompt": "x", "max_new_tokens": 10.0}, InvalidInput, "max_new_tokens must be an integer >= 1; got float"),
    ({"prompt": "x", "temperature": float("nan")}, InvalidInput, "temperature must be a number from 0 to 2; got nan"),
    ({"prompt": "x", "temperature": -0.1}, InvalidInput, "temperature must be between 0 (greedy) and 2; got -0.1"),
    ({"prompt": "x", "temperature": 1e9}, InvalidInput, "temperature must be between 0 (greedy) and 2"),
    ({"prompt": "x", "top_p": 0}, InvalidInput, "top_p must be in (0, 1]; got 0"),
    ({"prompt": "x", "top_p": float("inf")}, InvalidInput, "top_p must be a number in (0, 1]; got inf"),
    ({"prompt": "x", "seed": -1}, InvalidInput, "seed must be an integer from 0 to 2**63-1; got -1"),
    ({"prompt": "x", "seed": 2**64}, InvalidInput, "seed must be an integer from 0 to 2**63-1"),
    ({"prompt": "x", "stop": "."}, InvalidInput, "stop must be a list of strings, or omitted; got string '.'"),
    ({"prompt": "x", "stop": ["."] * 3}, InputTooLarge, "stop has 3 strings; at most 2"),
    ({"prompt": "x", "stop": [""]}, InvalidInput, "stop[0] must be a string of 1 to 100 characters"),
    ({"prompt": "x", "top_k": 5}, InvalidInput, "unknown argument(s) 'top_k' for inferq.generate"),
])
def test_generate_bad_input(kwargs: dict[str, Any], error: type[Exception], expected: str) -> None:
    assert expected in reject("generate", kwargs, error)


def test_several_type_errors_are_reported_together() -> None:
    message = reject("generate", {"prompt": 1, "max_new_tokens": "many"})
    assert "prompt must be a string; got int" in message
    assert "max_new_tokens must be an integer >= 1; got string 'many'" in message


@pytest.mark.parametrize(("kind", "kwargs", "where"), [
    ("embed", {"texts": ["fine", "bad \ud800"]}, "texts[1]"),
    ("classify", {"texts": ["x"], "labels": ["a", "\udfff"]}, "labels[1]"),
    ("generate", {"prompt": "\udc80 hi"}, "prompt"),
    ("generate", {"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content"),
    ("generate", {"prompt": "x", "stop": ["\ud800"]}, "stop[0]"),
])
def test_lone_surrogates_are_refused_with_their_position(kind: str, kwargs: dict[str, Any], where: str) -> None:
    # found by tests/test_fuzz.py: the tokenizer raised a bare TypeError on them
    with pytest.raises(InvalidInput, match=rf"{re.escape(where)} is not valid Unicode: a lone surrogate"):
        validate(kind, kwargs, Limits())  # type: ignore[arg-type]


def test_a_list_over_its_limit_is_refused_before_its_items_are_checked() -> None:
    """Two million wrong items took seconds and gigabytes of error reports before the count was looked at."""
    for kind, kwargs, says in (("embed", {"texts": [1] * 2_000_000}, "texts has 2000000 items; at most 256"),
                               ("classify", {"texts": ["x"], "labels": [None] * 100_000}, "labels has 100000 items"),
                               ("generate", {"messages": [7] * 100_000}, "messages has 100000 items"),
                               ("generate", {"prompt": "x", "stop": [0] * 100_000}, "stop has 100000 strings")):
        with pytest.raises(InputTooLarge, match=says):
            validate(kind, kwargs, Limits())
