"""JSON read from adapter files (header metadata, PEFT's ``adapter_config.json``) with limits.

A file is input we do not control: a value nested 200,000 brackets deep makes ``json.loads``
recurse until Python gives up, and a huge value costs memory for nothing. Every JSON text lohakr
reads from a file goes through ``parse_json``, which refuses both with an error naming the file and
the field.
"""

from __future__ import annotations

import json
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
        too_deep = _depth_exceeds(value, MAX_JSON_DEPTH)
    if too_deep:
        raise AdapterFormatError(
            f"{source}: {field} is JSON nested deeper than {MAX_JSON_DEPTH} levels; no trainer writes that, "
            "so the file is corrupt or hostile. Re-save it without that field"
        )
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True when lists/dicts in ``value`` nest deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
