"""The frontend's block-weight parser (web/lohakr_core.js) agrees with the loader's (blocks.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lohakr import BlockWeightsError, parse_block_weights
from lohakr.loaders.reference_models import reference_layout

SPECS = ["", "ALL", "NONE", "INALL", "MIDALL", "OUTALL", "INS", "IND", "MIDD", "OUTD", "OUTS", "outall, IN08=0.5",
         "IN04=0.5, OUT=0, TE2=0", "mid: 0.25, in8=2", "UNET=0.7", "te=0, other=0.5", "BASE=0.3",
         "0.5,1,0.9,1,1,0.8,1,1,1,0.7,1,1", ",".join(["0.25"] * 20), ",".join(["1"] * 17), ",".join(["0"] * 26),
         "IN99=1", "IN04=abc", "FOO", "1,1,1", "DOUBLE=0.5, SINGLE3=0", "transformer=0.2, te1=0", "JOINT=0, joint07=1",
         "layer=0.5, nref=0, CREF1=2", "single=0, other=0", "single3=0.5",
         ",".join(["0.5"] * 58), ",".join(["1"] * 39), ",".join(["0"] * 57), ",".join(["2"] * 61),
         ",".join(["1"] * 35)]


@pytest.mark.parametrize("family", ["sdxl", "sd1", "flux1", "chroma", "flux2", "sd3", "zimage", "qwenimage"])
def test_js_and_python_block_weights_agree(family):
    if not shutil.which("node"):
        pytest.skip("node is not installed")
    core = (Path(__file__).parent.parent / "web" / "lohakr_core.js").resolve().as_uri()
    script = (f"import {{ parseBlockWeights }} from '{core}';"
              f"const specs = {json.dumps(SPECS)};"
              f"console.log(JSON.stringify(specs.map((s) => parseBlockWeights(s, '{family}'))));")
    js = json.loads(subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True,
                                   check=True).stdout)
    blocks = reference_layout(family).blocks
    for spec, result in zip(SPECS, js, strict=True):
        try:
            weights = parse_block_weights(spec, blocks, family)
        except BlockWeightsError:
            assert result["ok"] is False, spec
            continue
        assert result["ok"] is True, (spec, result.get("error"))
        assert list(result["weights"]) == blocks
        assert {b: weights(b) for b in blocks} == result["weights"], spec
        assert sorted(weights.omitted) == sorted(result["omitted"]), spec


def test_js_layouts_are_the_reference_layouts():
    """The block editor's layouts (web/lohakr_core.js) are the full-size models' blocks (layouts/*.json)."""
    if not shutil.which("node"):
        pytest.skip("node is not installed")
    from lohakr.loaders.reference_models import FAMILIES

    core = (Path(__file__).parent.parent / "web" / "lohakr_core.js").resolve().as_uri()
    script = f"import {{ LAYOUTS }} from '{core}'; console.log(JSON.stringify(LAYOUTS));"
    layouts = json.loads(subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True,
                                        check=True).stdout)
    for family in FAMILIES:
        assert layouts[family] == reference_layout(family).blocks, family
