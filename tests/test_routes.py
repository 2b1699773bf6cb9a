"""The info route's path check: only names ComfyUI lists in its loras folders; traversal refused."""

from __future__ import annotations

import pytest

from lohakr.nodes.routes import BadNameError, checked_lora_path

LISTED = ["a.safetensors", "sub/b.safetensors"]


def full(name):
    return "/loras/" + name


@pytest.mark.parametrize("name", ["../secret.safetensors", "sub/../../etc/passwd", "/etc/passwd", "C:\\x.safetensors",
                                  "..\\x.safetensors", "", "a\x00.safetensors"])
def test_bad_names_are_refused(name):
    with pytest.raises(BadNameError):
        checked_lora_path(name, LISTED, full)


def test_unknown_names_are_not_found_and_listed_ones_resolve():
    with pytest.raises(LookupError):
        checked_lora_path("c.safetensors", LISTED, full)
    assert checked_lora_path("sub/b.safetensors", LISTED, full) == "/loras/sub/b.safetensors"
