"""Per-block strengths: A1111 lora-block-weight vectors, named presets and ``NAME=value`` lists.

Blocks (docs/names-and-blocks.md#blocks): SDXL ``TE1 TE2 IN00…IN08 M00 OUT00…OUT08 OTHER``; SD1.5
``TE IN00…IN11 M00 OUT00…OUT11 OTHER``. Accepted forms:

* an A1111 vector: 12 or 20 values for SDXL, 17 or 26 for SD1.5, starting with BASE (the text
  encoders). Blocks the vector does not list get 0, as in A1111; OTHER (time/label embeddings,
  output head) stays 1, as A1111 leaves unknown layers at 1.
* a named preset: ALL, NONE, INALL, MIDALL, OUTALL, INS, IND, MIDD, OUTD, OUTS (see PRESETS_HELP).
* named values ``IN04=0.5, OUT=0, TE2=0`` (groups IN, OUT, MID/M, TE/BASE, UNET, OTHER, ALL);
  unnamed blocks stay 1. A preset may come first: ``OUTALL, IN08=0.5``.

Transformers have their own blocks (``DOUBLE00…``, ``SINGLE00…``, ``JOINT00…``, ``LAYER00…``; families.py):
named values there take a block (``SINGLE3`` = ``SINGLE03``), a kind (``DOUBLE``), TE, TRANSFORMER
(every non-text-encoder block), OTHER or ALL; the ALL and NONE presets apply too; a vector is BASE
then every numbered block in layout order (Flux: 1 + 19 + 38 values, as the Inspire pack orders them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import BlockWeightsError


def _ins(n: int) -> list[str]:
    return [f"IN{i:02d}" for i in range(n)]


def _outs(n: int) -> list[str]:
    return [f"OUT{i:02d}" for i in range(n)]


# A1111 lora-block-weight layouts (hako-mikan/sd-webui-lora-block-weight BLOCKID12/20/17/26).
VECTOR_LAYOUTS: dict[int, tuple[str, list[str]]] = {
    12: ("sdxl", ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_outs(6)]),
    20: ("sdxl", ["BASE", *_ins(9), "M00", *_outs(9)]),
    17: ("sd1", ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                 *[f"OUT{i:02d}" for i in range(3, 12)]]),
    26: ("sd1", ["BASE", *_ins(12), "M00", *_outs(12)]),
}
FAMILY_VECTOR_LENGTHS = {"sdxl": (12, 20), "sd1": (17, 26), "sd2": (17, 26)}

PRESETS_HELP = (
    "ALL (everything 1), NONE (everything 0), INALL / MIDALL / OUTALL (text encoders plus all IN, "
    "the middle block, or all OUT blocks), INS / IND (text encoders plus the shallow or deep half "
    "of the IN blocks), OUTD / OUTS (text encoders plus the OUT half nearest the middle block, or "
    "nearest the image), MIDD (IND + M00 + OUTD). Halves are over all IN/OUT blocks of the model "
    "(SD.Next's rule); the shallow/near-middle half takes the odd block."
)
FORMS_HELP = (
    "accepted forms: an A1111 lora-block-weight vector (12 or 20 values for SDXL, 17 or 26 for "
    "SD1.5, BASE first), a preset name (ALL, NONE, INALL, MIDALL, OUTALL, INS, IND, MIDD, OUTD, "
    "OUTS), or named values such as 'IN04=0.5, OUT=0, TE2=0' (groups IN, OUT, MID, TE, UNET, "
    "OTHER, ALL; a preset may come first)"
)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class BlockWeights:
    """Multipliers per block; blocks not in ``weights`` get 1."""

    weights: dict[str, float] = field(default_factory=dict)
    spec: str = ""
    omitted: frozenset[str] = frozenset()

    def __call__(self, block: str) -> float:
        return self.weights.get(block, 1.0)

    def is_identity(self) -> bool:
        return all(v == 1.0 for v in self.weights.values())

    def format(self) -> str:
        return ", ".join(f"{b}={v:g}" for b, v in self.weights.items())


def _halves(names: list[str]) -> tuple[list[str], list[str]]:
    cut = math.ceil(len(names) / 2)
    return names[:cut], names[cut:]


def presets(blocks: Sequence[str]) -> dict[str, dict[str, float]]:
    """The named presets on a layout, each a full block → weight map."""
    te = [b for b in blocks if b.startswith("TE")]
    ins = [b for b in blocks if b.startswith("IN")]
    outs = [b for b in blocks if b.startswith("OUT")]
    mid = [b for b in blocks if b == "M00"]
    in_shallow, in_deep = _halves(ins)
    out_near_mid, out_near_image = _halves(outs)

    def only(*groups: list[str]) -> dict[str, float]:
        chosen = {b for g in groups for b in g} | set(te)
        return {b: (1.0 if b in chosen or b == "OTHER" else 0.0) for b in blocks}

    return {
        "ALL": {b: 1.0 for b in blocks},
        "NONE": {b: 0.0 for b in blocks},
        "INALL": only(ins),
        "MIDALL": only(mid),
        "OUTALL": only(outs),
        "INS": only(in_shallow),
        "IND": only(in_deep),
        "MIDD": only(in_deep, mid, out_near_mid),
        "OUTD": only(out_near_mid),
        "OUTS": only(out_near_image),
    }


def _group(name: str, blocks: Sequence[str]) -> list[str]:
    """Blocks named by ``name``: a block id (``IN4`` = ``IN04``) or a group."""
    upper = name.strip().upper()
    te = [b for b in blocks if b.startswith("TE")]
    groups = {
        "ALL": list(blocks),
        "IN": [b for b in blocks if b.startswith("IN")],
        "OUT": [b for b in blocks if b.startswith("OUT")],
        "MID": ["M00"], "M": ["M00"], "M0": ["M00"], "MIDDLE": ["M00"],
        "TE": te, "BASE": te, "CLIP": te,
        "UNET": [b for b in blocks if not b.startswith("TE")],
        "OTHER": ["OTHER"],
    }
    groups["TRANSFORMER"] = groups["DIT"] = groups["MODEL"] = groups["UNET"]
    if upper in groups:
        return [b for b in groups[upper] if b in blocks]
    numbered = [b for b in blocks if re.fullmatch(rf"{re.escape(upper)}\d+", b)] if upper.isalpha() else []
    if numbered:  # a transformer's kind of block: DOUBLE = DOUBLE00, DOUBLE01…
        return numbered
    m = re.fullmatch(r"([A-Z]+)(\d+)", upper)
    if m:
        block = f"{m.group(1)}{int(m.group(2)):02d}"
        if block in blocks:
            return [block]
    if upper in blocks:
        return [upper]
    raise BlockWeightsError(
        f"unknown block {name.strip()!r}; this model has {', '.join(blocks)}; {FORMS_HELP}"
    )


def parse_block_weights(
    spec: str | Mapping[str, float] | Sequence[float] | BlockWeights | None,
    blocks: Sequence[str],
    family: str = "unknown",
) -> BlockWeights:
    """Parse any accepted form against a layout's ``blocks``; raise ``BlockWeightsError`` otherwise."""
    if spec is None:
        return BlockWeights()
    if isinstance(spec, BlockWeights):
        return spec
    blocks = list(blocks)
    if isinstance(spec, Mapping):
        return _named([(str(k), _value(v, str(k))) for k, v in spec.items()], blocks, str(dict(spec)))
    if not isinstance(spec, str):
        values = [_value(v, f"value {i + 1}") for i, v in enumerate(spec)]
        return _vector(values, blocks, family, str(list(spec)))
    text = spec.strip()
    if not text:
        return BlockWeights()
    tokens = [t for t in re.split(r"[,\s;]+", text) if t]
    if all(_NUMBER.match(t) for t in tokens):
        return _vector([float(t) for t in tokens], blocks, family, text)
    table = presets(blocks)
    start: dict[str, float] = {}
    pairs: list[tuple[str, float]] = []
    for index, token in enumerate(re.split(r"[,;\n]+", text)):
        token = token.strip()
        if not token:
            continue
        if "=" in token or ":" in token:
            name, _, value = re.split(r"([=:])", token, maxsplit=1)
            pairs.append((name, _value(value, name)))
        elif index == 0 and token.upper() in table:
            start = dict(table[token.upper()])
        else:
            raise BlockWeightsError(f"cannot read {token!r} in block weights {text!r}; {FORMS_HELP}")
    result = _named(pairs, blocks, text)
    if start:
        start.update(result.weights)
        result.weights = start
    return result


def _value(raw: object, name: str) -> float:
    try:
        value = float(str(raw).strip()) if not isinstance(raw, (int, float)) else float(raw)
    except ValueError:
        raise BlockWeightsError(f"{name.strip()}: {raw!r} is not a number; {FORMS_HELP}") from None
    if not math.isfinite(value):
        raise BlockWeightsError(f"{name.strip()}: {raw!r} is not a finite number")
    return value


def _named(pairs: Iterable[tuple[str, float]], blocks: list[str], text: str) -> BlockWeights:
    weights: dict[str, float] = {}
    for name, value in pairs:
        for block in _group(name, blocks):
            weights[block] = value
    return BlockWeights(weights=weights, spec=text)


def transformer_vector_names(blocks: Sequence[str]) -> list[str] | None:
    """A transformer layout's vector: BASE (the text encoders), then every numbered block in layout
    order (Flux: the double blocks, then the single ones, as the Inspire pack orders them); ``None``
    for a UNet layout, whose vectors are A1111's."""
    numbered = [b for b in blocks if not b.startswith("TE") and b != "OTHER"]
    if not numbered or any(re.fullmatch(r"(IN|OUT|M)\d+", b) for b in numbered):
        return None
    return ["BASE", *numbered]


def _vector(values: list[float], blocks: list[str], family: str, text: str) -> BlockWeights:
    n = len(values)
    names = transformer_vector_names(blocks)
    if names is not None:
        if n != len(names):
            raise BlockWeightsError(
                f"a block-weight vector for this model has {len(names)} values (BASE, then "
                f"{names[1]}…{names[-1]}); got {n}. {FORMS_HELP}")
        return _weights_of_vector(values, names, blocks, text)
    if n not in VECTOR_LAYOUTS:
        raise BlockWeightsError(
            f"a block-weight vector needs 12 or 20 values (SDXL) or 17 or 26 (SD1.5); got {n}. "
            f"{FORMS_HELP}"
        )
    vector_family, names = VECTOR_LAYOUTS[n]
    if family in FAMILY_VECTOR_LENGTHS and n not in FAMILY_VECTOR_LENGTHS[family]:
        want = " or ".join(str(k) for k in FAMILY_VECTOR_LENGTHS[family])
        raise BlockWeightsError(
            f"a {n}-value vector is for {'SDXL' if vector_family == 'sdxl' else 'SD1.5'}; this model "
            f"takes {want} values"
        )
    return _weights_of_vector(values, names, blocks, text)


def _weights_of_vector(values: list[float], names: list[str], blocks: list[str], text: str) -> BlockWeights:
    """Blocks the vector lists get its values (BASE: every text encoder), the others 0, OTHER 1."""
    te = [b for b in blocks if b.startswith("TE")]
    weights = {b: 0.0 for b in blocks if b != "OTHER"}
    listed: set[str] = set()
    for name, value in zip(names, values, strict=True):
        targets = te if name == "BASE" else [name]
        for block in targets:
            if block in weights:
                weights[block] = value
                listed.add(block)
    omitted = frozenset(b for b in weights if b not in listed)
    return BlockWeights(weights=weights, spec=text, omitted=omitted)


def zeroed_by_omission(weights: BlockWeights, touched_blocks: Iterable[str]) -> str | None:
    """A warning naming the blocks this file touches that a short vector silently zeroes."""
    hit = sorted(set(touched_blocks) & weights.omitted, key=lambda block: (block[:2], block))
    if not hit:
        return None
    return (
        f"the block-weight vector does not list {', '.join(hit)}, which this file patches; as in "
        "A1111 they get weight 0. Use the 20-value (SDXL) or 26-value (SD1.5) form, or named "
        "values such as 'IN04=0.5', to keep them"
    )
