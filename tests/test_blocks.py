"""Block-weight specs: A1111 vectors, presets, named values, errors."""

from __future__ import annotations

import pytest

from lohakr import BlockWeightsError, parse_block_weights, presets
from lohakr.loaders.blocks import zeroed_by_omission

SDXL = ["TE1", "TE2", *[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)], "OTHER"]
SD1 = ["TE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)], "OTHER"]


def test_sdxl_12_vector_zeroes_omitted_blocks_and_keeps_other():
    w = parse_block_weights("0.5,1,0.9,1,1,0.8,1,1,1,0.7,1,1", SDXL, "sdxl")
    assert w("TE1") == w("TE2") == 0.5
    assert w("IN04") == 1 and w("IN05") == 0.9 and w("M00") == 0.8 and w("OUT03") == 0.7
    assert w("IN00") == w("IN03") == w("IN06") == w("OUT06") == w("OUT08") == 0
    assert w("OTHER") == 1
    assert {"IN00", "IN01", "IN02", "IN03", "IN06", "OUT06", "OUT07", "OUT08"} == set(w.omitted)
    warning = zeroed_by_omission(w, ["IN01", "IN04", "OUT07"])
    assert "IN01, OUT07" in warning and "20-value" in warning
    assert zeroed_by_omission(w, ["IN04"]) is None


def test_sdxl_20_vector_and_sd1_17_26():
    w = parse_block_weights(["1"] * 10 + ["0"] * 10, SDXL, "sdxl")
    assert w("IN08") == 1 and w("M00") == 0 and w("OUT08") == 0 and not w.omitted
    w = parse_block_weights(" ".join(["1"] * 17), SD1, "sd1")
    assert w("IN01") == 1 and w("IN03") == 0 and w("OUT03") == 1 and w("OUT02") == 0
    w = parse_block_weights([0.25] + [1] * 25, SD1, "sd1")
    assert w("TE") == 0.25 and w("IN11") == 1


def test_vector_for_the_wrong_family_and_wrong_length():
    with pytest.raises(BlockWeightsError, match="a 17-value vector is for SD1.5; this model takes 12 or 20"):
        parse_block_weights(",".join(["1"] * 17), SDXL, "sdxl")
    with pytest.raises(BlockWeightsError, match="needs 12 or 20 values .* got 5.*accepted forms"):
        parse_block_weights("1,1,1,1,1", SDXL, "sdxl")


def test_named_values_and_groups():
    w = parse_block_weights("IN04=0.5, OUT=0, TE2=0, mid: 0.25, in8=2", SDXL, "sdxl")
    assert w("IN04") == 0.5 and w("IN08") == 2 and w("IN05") == 1
    assert all(w(f"OUT{i:02d}") == 0 for i in range(9))
    assert w("TE2") == 0 and w("TE1") == 1 and w("M00") == 0.25 and w("OTHER") == 1
    assert parse_block_weights({"BASE": 0}, SDXL)("TE1") == 0
    assert parse_block_weights("UNET=0.5", SD1, "sd1")("OTHER") == 0.5


def test_presets_and_preset_with_overrides():
    table = presets(SDXL)
    assert set(table) == {"ALL", "NONE", "INALL", "MIDALL", "OUTALL", "INS", "IND", "MIDD", "OUTD", "OUTS"}
    ins = [b for b in SDXL if b.startswith("IN") and table["INS"][b] == 1]
    assert ins == ["IN00", "IN01", "IN02", "IN03", "IN04"]
    assert [b for b in SDXL if b.startswith("OUT") and table["OUTS"][b] == 1] == ["OUT05", "OUT06", "OUT07", "OUT08"]
    assert table["MIDD"]["M00"] == 1 and table["MIDD"]["IN08"] == 1 and table["MIDD"]["OUT00"] == 1
    assert table["MIDD"]["IN00"] == 0 and table["MIDD"]["OUT08"] == 0
    assert table["OUTALL"]["TE1"] == 1 and table["NONE"]["OTHER"] == 0
    w = parse_block_weights("outall, IN08=0.5", SDXL, "sdxl")
    assert w("IN08") == 0.5 and w("IN07") == 0 and w("OUT01") == 1
    assert parse_block_weights("NONE", SD1, "sd1")("IN05") == 0


@pytest.mark.parametrize("bad, message", [
    ("IN99=1", "unknown block 'IN99'"),
    ("IN04=abc", "'abc' is not a number"),
    ("FOO", "cannot read 'FOO'"),
    ("IN04=inf", "not a finite number"),
])
def test_bad_specs_list_the_accepted_forms(bad, message):
    with pytest.raises(BlockWeightsError, match=message):
        parse_block_weights(bad, SDXL, "sdxl")


def test_empty_spec_is_identity():
    assert parse_block_weights("", SDXL).is_identity()
    assert parse_block_weights(None, SDXL).is_identity()
