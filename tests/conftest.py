"""Shared fixtures: real LyCORIS-made adapter files on the tiny models, built once per session."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import lycoris.logging  # noqa: E402,F401  (creates LyCORIS' logger, which prints INFO by default)
from lycoris_oracle import Fixture, make_fixture  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def lycoris_file(tmp_path_factory):
    """``lycoris_file(family, variant, dtype="fp32", naming="diffusers") -> Fixture``, cached."""
    cache: dict[tuple, Fixture] = {}
    workdir = tmp_path_factory.mktemp("lycoris")

    def get(family: str, variant: str, dtype: str = "fp32", naming: str = "diffusers",
            metadata: dict | None = None) -> Fixture:
        key = (family, variant, dtype, naming, tuple(sorted((metadata or {}).items())))
        if key not in cache:
            sub = workdir / f"f{len(cache)}"
            sub.mkdir()
            cache[key] = make_fixture(family, variant, dtype, sub, naming=naming, metadata=metadata)
        return cache[key]

    return get


@pytest.fixture
def native_off(monkeypatch):
    """Patch through PyTorch's kernels only, as on a machine without a C compiler."""
    from lohakr.loaders import native

    monkeypatch.setattr(native, "_state", {"library": None, "reason": "off for this test"})


@pytest.fixture
def native_on():
    """The native kernels, or a skip saying why this machine cannot build them. Built is enough:
    the tests compare their bits themselves (a failed self-check must fail them, not skip them)."""
    from lohakr.loaders import native

    if native._load() is None:
        pytest.skip(native.status())
    return native


@pytest.fixture(params=[256, 512], ids=["8 lanes", "16 lanes"])
def vector_bits(request, native_on):
    """The row kernels at both vector widths (16 lanes where this CPU has AVX-512; else a skip),
    their bits checked again at each; the width chosen at load is put back after."""
    previous = native_on.vector_bits()
    if native_on.use_vector_bits(request.param) != request.param:
        native_on.use_vector_bits(previous)
        pytest.skip("this CPU (or PyTorch build) has no AVX-512: the 16-lane kernels are not used here")
    yield request.param
    native_on.use_vector_bits(previous)
