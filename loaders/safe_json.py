"""JSON read from adapter files (header metadata, PEFT's ``adapter_config.json``) with limits.

A file is input we do not control: a value nested 200,000 brackets deep makes ``json.loads``
recurse until Python gives up, and a huge value costs memory for nothing. Every JSON text lohakr
reads from a file goes through ``parse_json``, which refuses both with an error naming the file and
the field.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from .errors import AdapterFormatError

MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64


class JsonSyntaxError(AdapterFormatError):
    """The text is not JSON at all (as opposed to JSON beyond the limits)."""


def parse_json(text: str | bytes, source: str, field: str) -> Any:
    """``json.loads(text)``, refusing texts over ``MAX_JSON_BYTES`` or nested deeper than
    ``MAX_JSON_DEPTH``; malformed JSON raises too. Errors are ``AdapterFormatError`` naming
    ``source`` (the file) and ``field`` (the header key or config file)."""
    size = len(text)
    if size > MAX_JSON_BYTES:
        raise AdapterFormatError(
            f"{source}: {field} holds {size} bytes of JSON, more than the {MAX_JSON_BYTES} lohakr reads; "
            "the file is corrupt or hostile. Re-save it without that field"
        )
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        too_deep = True
    except ValueError as err:
        raise JsonSyntaxError(f"{source}: cannot read {field}: it is not valid JSON ({err})") from err
    else:
        too_deep = _nesting_depth(text) > MAX_JSON_DEPTH if isinstance(value, (dict, list)) else False
    if too_deep:
        raise AdapterFormatError(
            f"{source}: {field} is JSON nested deeper than {MAX_JSON_DEPTH} levels; no trainer writes that, "
            "so the file is corrupt or hostile. Re-save it without that field"
        )
    return value


# A JSON string (quotes, escapes) and a run of anything but brackets: what the depth scan drops.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _nesting_depth(text: str | bytes) -> int:
    """How deep lists/dicts nest in ``text``, JSON that ``json.loads`` has accepted: with its
    strings dropped, the brackets left are the containers' own, so the depth is their running sum's
    maximum. Scans the text in C (splits, regular expressions, ``accumulate``) instead of walking the
    parsed value object by object: a safetensors header holds tens of thousands of them."""
    if not isinstance(text, str):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:  # UTF-16/32, which json.loads detects: its decoded form
            text = bytes(text).decode(json.detect_encoding(bytes(text)), "surrogatepass")
    if "\\" in text:  # escapes: a quote may be part of a string, so strings are matched whole
        outside = _STRING.sub("", text)
    else:  # none: every quote opens or closes a string, so every other piece lies outside them
        outside = "".join(text.split('"')[::2])
    brackets = _NOT_BRACKETS.sub("", outside)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)
