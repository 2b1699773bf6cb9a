"""The JSON limits every text read from a file goes through (loaders/safe_json.py): the nesting
depth is measured on the text, so it must equal the depth of the value ``json.loads`` built, with
brackets inside strings (escaped quotes included) not counted."""

from __future__ import annotations

import json
import random

import pytest

from lohakr.loaders.errors import AdapterFormatError
from lohakr.loaders.safe_json import MAX_JSON_DEPTH, _nesting_depth, parse_json


def walked_depth(value) -> int:
    """The reference: how deep lists/dicts nest in a parsed value."""
    if isinstance(value, dict):
        return 1 + max(map(walked_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(walked_depth, value), default=0)
    return 0


TRICKY_STRINGS = ['[', ']]]', '{"a": [1]}', 'quote \\" [', '\\\\', '\\\\"', 'ü[é]', '\\u005b', '}{', '']


def random_value(rng: random.Random, depth: int):
    if depth == 0 or rng.random() < 0.2:
        return rng.choice([rng.choice(TRICKY_STRINGS), 1, -2.5e3, None, True, rng.choice(TRICKY_STRINGS) * 3])
    if rng.random() < 0.5:
        return [random_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(TRICKY_STRINGS) + str(i): random_value(rng, depth - 1) for i in range(rng.randint(0, 3))}


@pytest.mark.parametrize("seed", range(200))
def test_the_text_depth_equals_the_parsed_values(seed):
    rng = random.Random(seed)
    value = random_value(rng, rng.randint(0, 12))
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False), json.dumps(value, indent=1)):
        assert _nesting_depth(text) == walked_depth(json.loads(text))
        assert _nesting_depth(text.encode("utf-8")) == walked_depth(json.loads(text))
        assert _nesting_depth(text.encode("utf-16")) == walked_depth(json.loads(text.encode("utf-16")))


def test_strings_full_of_brackets_do_not_count():
    text = json.dumps({"a": "[" * 500 + '\\"' + "{" * 500})
    assert _nesting_depth(text) == 1
    assert parse_json(text, "f.safetensors", "metadata") == json.loads(text)


def test_the_limit_is_exact():
    at_limit = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(at_limit, "f.safetensors", "metadata") == json.loads(at_limit)
    beyond = "[" + at_limit + "]"
    with pytest.raises(AdapterFormatError, match=r"f\.safetensors: metadata is JSON nested deeper than 64"):
        parse_json(beyond, "f.safetensors", "metadata")
    with pytest.raises(AdapterFormatError, match="nested deeper"):
        parse_json(beyond.encode("utf-16"), "f.safetensors", "metadata")


@pytest.mark.parametrize("text", ['"[[["', "12", "null", '"\\"]"'])
def test_scalars_are_depth_zero(text):
    assert parse_json(text, "f.safetensors", "metadata") == json.loads(text)
