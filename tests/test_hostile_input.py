"""Hostile and malformed adapter files, generated at test time.

Every case is a file written here, then parsed, loaded and strictly loaded into a tiny SD1.5
pipeline. Each asserts the error class and that the message names the file (or asserts the warning
the loader promises), and after every refusal that the pipeline's weights are bit-identical and no
adapter is registered. No test passes by catching ``Exception``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lohakr
from lohakr import (
    AdapterFormatError,
    AdapterShapeError,
    BaseModelMismatchError,
    LohakrError,
    StrictLoadError,
    load_adapter,
)
from lohakr.loaders import apply, tiny_models
from lohakr.loaders.diffusers_pipeline import pipeline_layout
from lohakr.loaders.errors import NonFiniteUpdateError, NothingToApplyError

COMPONENTS = ("unet", "text_encoder")


# -- the model and its layers ------------------------------------------------------------------------
def make_pipe(tmp_path: Path, dtype: torch.dtype = torch.float32, **enable):
    pipe = tiny_models.make_sd15_pipeline(tmp_path / "tok")
    pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return lohakr.enable(pipe, **enable)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return make_pipe(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def pipe_fp16(tmp_path_factory):
    return make_pipe(tmp_path_factory.mktemp("hostile16"), torch.float16)


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in COMPONENTS for k, v in getattr(pipe, c).state_dict().items()}


def assert_untouched(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]
    assert pipe.lycoris_adapters() == []


@dataclass(frozen=True)
class Layer:
    path: str
    sgm_path: str
    shape: tuple[int, int]

    @property
    def kohya(self) -> str:
        return "lora_unet_" + self.path.replace(".", "_")

    @property
    def kohya_sgm(self) -> str:
        return "lora_unet_" + self.sgm_path.replace(".", "_")


def unet_layer(pipe, suffix: str = "attn1.to_q", index: int = 0) -> Layer:
    layout = pipeline_layout(pipe)
    targets = [t for t in layout.targets.values() if t.component == "unet" and t.path.endswith(suffix)]
    t = targets[index]
    return Layer(t.path, t.sgm_path, t.weight_shape)


LAYER = Layer("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
              "input_blocks.1.1.transformer_blocks.0.attn1.to_q", (32, 32))


def test_the_layer_used_below_exists(pipe):
    assert unet_layer(pipe) == LAYER


# -- file builders -----------------------------------------------------------------------------------
def loha(name: str, shape=LAYER.shape, rank: int = 2, value: float = 0.1, alpha: float | None = 1.0,
         dtype=torch.float32, **override) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(len(name))
    out, inn = shape
    tensors = {
        f"{name}.hada_w1_a": torch.randn(out, rank, generator=g) * value,
        f"{name}.hada_w1_b": torch.randn(rank, inn, generator=g) * value,
        f"{name}.hada_w2_a": torch.randn(out, rank, generator=g) * value,
        f"{name}.hada_w2_b": torch.randn(rank, inn, generator=g) * value,
    }
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    tensors.update({f"{name}.{k}": v for k, v in override.items()})
    return tensors


def lokr(name: str, w1=(4, 4), w2=(8, 8), value: float = 0.1, **override) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(len(name) + 1)
    tensors = {f"{name}.lokr_w1": torch.randn(*w1, generator=g) * value,
               f"{name}.lokr_w2": torch.randn(*w2, generator=g) * value}
    tensors.update({f"{name}.{k}": v for k, v in override.items()})
    return tensors


def write(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "adapter.safetensors",
          metadata: dict[str, str] | None = None) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)
    return path


def raw(tmp_path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None,
        name: str = "raw.safetensors") -> Path:
    """A safetensors file written byte by byte: any header, any claimed length."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)
    return path


def good_file(tmp_path: Path) -> Path:
    return write(tmp_path, loha(LAYER.kohya))


def truncated(at: int | Callable[[int], int]):
    def build(tmp_path):
        data = good_file(tmp_path).read_bytes()
        cut = at(len(data)) if callable(at) else at
        path = tmp_path / "truncated.safetensors"
        path.write_bytes(data[:cut])
        return path
    return build


def header_len_of(tmp_path: Path) -> int:
    return struct.unpack("<Q", good_file(tmp_path).read_bytes()[:8])[0]


def peft_folder(tmp_path: Path, config: dict | str | None) -> Path:
    folder = tmp_path / "peft"
    folder.mkdir(exist_ok=True)
    tensors = loha(f"base_model.model.{LAYER.path}", alpha=None)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "adapter_config.json").write_text(text)
    return folder


PEFT_CONFIG = {"peft_type": "LOHA", "r": 2, "alpha": 4}


def symlink_loop(tmp_path: Path) -> Path:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    os.symlink(b, a)
    os.symlink(a, b)
    return a


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# -- the corpus: refused while parsing ---------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], Path]
    error: type[Exception]
    match: str


A = "adapter.safetensors"
PARSE_CASES = [
    Case("empty file", lambda p: (p / A).write_bytes(b"") or p / A, AdapterFormatError, "the file is empty"),
    Case("truncated at 4 bytes", truncated(4), AdapterFormatError, "not a safetensors file"),
    Case("truncated after the length", truncated(8), AdapterFormatError, "not a safetensors file"),
    Case("truncated inside the header", truncated(40), AdapterFormatError, "not a safetensors file"),
    Case("truncated inside the data", truncated(lambda n: n - 100), AdapterFormatError, "truncated or corrupt"),
    Case("truncated by one byte", truncated(lambda n: n - 1), AdapterFormatError, "truncated or corrupt"),
    Case("header length beyond the file", lambda p: raw(p, b'{"a":1}', header_len=10_000), AdapterFormatError,
         "not a safetensors file"),
    Case("huge claimed header", lambda p: raw(p, b'{"a":1}', header_len=2**62), AdapterFormatError,
         "not a safetensors file"),
    Case("zero header length", lambda p: raw(p, b'{"a":1}', header_len=0), AdapterFormatError,
         "not a safetensors file"),
    Case("header not JSON", lambda p: raw(p, b"{this is not json}"), AdapterFormatError,
         "cannot read the safetensors header: it is not valid JSON"),
    Case("header nested 5000 deep", lambda p: raw(p, ('{"a":' + deep(5000) + "}").encode()), AdapterFormatError,
         "the safetensors header is JSON nested deeper"),
    Case("header nested 65 deep", lambda p: raw(p, ('{"a":' + deep(64) + "}").encode()), AdapterFormatError,
         "the safetensors header is JSON nested deeper than 64"),
    Case("a shape of true", lambda p: raw(p, {"m.hada_w1_a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}},
                                          bytes(1)), AdapterFormatError, "invalid shape or offsets"),
    Case("unknown dtype", lambda p: raw(p, {"m.hada_w1_a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
                                        bytes(8)), AdapterFormatError, "unknown dtype 'Q7'"),
    Case("overlapping offsets", lambda p: raw(p, {
        "m.hada_w1_a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "m.hada_w1_b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        AdapterFormatError, "offsets overlap or leave gaps"),
    Case("offsets beyond the data", lambda p: raw(p, {
        "m.hada_w1_a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
        AdapterFormatError, "not a readable safetensors"),
    Case("shape and bytes disagree", lambda p: raw(p, {
        "m.hada_w1_a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
        AdapterFormatError, "shape, dtype and offsets disagree"),
    Case("shape bomb in the header", lambda p: raw(p, {
        "m.hada_w1_a": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 8]}}, bytes(8)),
        AdapterFormatError, "shape, dtype and offsets disagree"),
    Case("metadata value not a string", lambda p: raw(p, {
        "__metadata__": {"ss_network_args": {"a": 1}},
        "m.hada_w1_a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        AdapterFormatError, "not a readable safetensors"),
    Case("duplicate tensor name in the header", lambda p: raw(
        p, b'{"m.alpha": {"dtype":"F32","shape":[],"data_offsets":[0,4]},'
           b' "m.alpha": {"dtype":"F32","shape":[],"data_offsets":[4,8]}}', bytes(8)),
        AdapterFormatError, "not a readable safetensors"),
    Case("pickle", lambda p: torch.save({"a": torch.ones(1)}, p / A) or p / A, AdapterFormatError,
         "pickled PyTorch checkpoint"),
    Case("symlink loop", symlink_loop, AdapterFormatError, "cannot read the file"),
    Case("a folder", lambda p: (p / "folder.safetensors").mkdir() or p / "folder.safetensors", AdapterFormatError,
         "is a folder, not a file"),
    Case("NaN in a factor", lambda p: write(p, loha(LAYER.kohya, hada_w1_a=torch.full((32, 2), math.nan))),
         AdapterFormatError, "hada_w1_a contains 64 NaN/inf"),
    Case("inf in a factor", lambda p: write(p, loha(LAYER.kohya, hada_w2_b=torch.full((2, 32), math.inf))),
         AdapterFormatError, "hada_w2_b contains 64 NaN/inf"),
    Case("NaN alpha", lambda p: write(p, loha(LAYER.kohya, alpha=math.nan)), AdapterFormatError, "alpha is nan"),
    Case("alpha 1e300 as float64", lambda p: write(p, loha(LAYER.kohya, alpha=None) | {
        f"{LAYER.kohya}.alpha": torch.tensor(1e300, dtype=torch.float64)}), AdapterFormatError,
        "beyond float32's range"),
    Case("NaN stored scalar", lambda p: write(p, loha(LAYER.kohya, scalar=torch.tensor(math.nan))),
         AdapterFormatError, "the stored scalar is nan"),
    Case("rank-0 LoHa", lambda p: write(p, loha(LAYER.kohya, rank=0)), AdapterShapeError, r"no values \(rank 0\?\)"),
    Case("rank-0 LoKr", lambda p: write(p, {f"{LAYER.kohya}.lokr_w1": torch.ones(4, 4),
                                            f"{LAYER.kohya}.lokr_w2_a": torch.ones(8, 0),
                                            f"{LAYER.kohya}.lokr_w2_b": torch.ones(0, 8)}),
         AdapterShapeError, r"no values \(rank 0\?\)"),
    Case("factor of the wrong rank (ndim)", lambda p: write(p, loha(LAYER.kohya, hada_w1_b=torch.ones(2))),
         AdapterShapeError, "an input factor is"),
    Case("factors that do not chain", lambda p: write(p, loha(LAYER.kohya, hada_w1_a=torch.ones(32, 3))),
         AdapterShapeError, "rank mismatch"),
    Case("a 1-D Kronecker factor", lambda p: write(p, {f"{LAYER.kohya}.lokr_w1_a": torch.ones(1, 8),
                                                       f"{LAYER.kohya}.lokr_w1_b": torch.ones(8, 2),
                                                       f"{LAYER.kohya}.lokr_w2": torch.ones(6)}),
         AdapterShapeError, "a Kronecker factor has at least two dimensions"),
    Case("an output factor with a kernel", lambda p: write(p, {f"{LAYER.kohya}.lora_up.weight": torch.ones(3, 1, 3),
                                                               f"{LAYER.kohya}.lora_down.weight": torch.ones(1, 6)}),
         AdapterShapeError, r"lora_up.weight has shape \(3, 1, 3\); an output factor is"),
    Case("a 1-D input factor", lambda p: write(p, {f"{LAYER.kohya}.lora_up.weight": torch.ones(8, 8, 1),
                                                   f"{LAYER.kohya}.lora_down.weight": torch.ones(1),
                                                   f"{LAYER.kohya}.lora_mid.weight": torch.ones(8, 1, 4)}),
         AdapterShapeError, "an input factor is"),
    Case("a Tucker output factor with three dimensions", lambda p: write(p, loha(LAYER.kohya, alpha=None) | {
        f"{LAYER.kohya}.hada_t1": torch.ones(2, 2, 3, 3), f"{LAYER.kohya}.hada_t2": torch.ones(2, 2, 3, 3),
        f"{LAYER.kohya}.hada_w1_a": torch.ones(2, 32, 1), f"{LAYER.kohya}.hada_w2_a": torch.ones(2, 32)}),
         AdapterShapeError, "beside a Tucker core"),
    Case("a bias delta of the wrong shape", lambda p: write(p, {f"{LAYER.kohya}.diff": torch.ones(32, 32),
                                                                f"{LAYER.kohya}.diff_b": torch.ones(2, 16)}),
         AdapterShapeError, r"diff_b has shape \(2, 16\); the bias delta of a layer with 32 outputs is \(32,\)"),
    Case("integer factors", lambda p: write(p, loha(LAYER.kohya, hada_w1_a=torch.ones(32, 2, dtype=torch.int32))),
         AdapterFormatError, "factors must be floating point"),
    Case("LoHa and LoKr keys in one module", lambda p: write(p, loha(LAYER.kohya) | lokr(LAYER.kohya)),
         AdapterFormatError, "mixes LoHa and LoKr"),
    Case("alpha with several values", lambda p: write(p, loha(LAYER.kohya, alpha=None) | {
        f"{LAYER.kohya}.alpha": torch.ones(3)}), AdapterFormatError, "alpha has shape"),
    Case("a model checkpoint", lambda p: write(p, {
        f"model.diffusion_model.input_blocks.{i}.0.{part}": torch.ones(4) for i in range(3)
        for part in ("weight", "bias")}), AdapterFormatError, "this is a model checkpoint, not an adapter"),
    Case("unrelated tensors", lambda p: write(p, {"foo": torch.ones(2), "bar.baz": torch.ones(2)}),
         AdapterFormatError, "no adapter module"),
    Case("only an unsupported algorithm", lambda p: write(p, {f"{LAYER.kohya}.oft_blocks": torch.ones(2, 4, 4)}),
         AdapterFormatError, "no module lohakr can apply.*OFT"),
    Case("metadata bomb: ss_network_args nested", lambda p: write(p, loha(LAYER.kohya), metadata={
        "ss_network_args": deep(200_000)}), AdapterFormatError, "ss_network_args is JSON nested deeper"),
    Case("metadata bomb: ss_tag_frequency 17 MB", lambda p: write(p, loha(LAYER.kohya), metadata={
        "ss_tag_frequency": json.dumps({"d": {"t" * 1000: 1}}) + " " * (17 << 20)}), AdapterFormatError,
        "the safetensors header holds .* bytes of JSON"),
    Case("PEFT config nested 200000 deep", lambda p: peft_folder(p, '{"a": ' + deep(200_000) + "}"),
         AdapterFormatError, "adapter_config.json: the PEFT config is JSON nested deeper"),
    Case("PEFT config not an object", lambda p: peft_folder(p, "[1, 2]"), AdapterFormatError,
         "a PEFT config is a JSON object"),
    Case("PEFT config r not a number", lambda p: peft_folder(p, {**PEFT_CONFIG, "r": "two"}), AdapterFormatError,
         "r for .* is 'two'"),
    Case("PEFT config rank_pattern a list", lambda p: peft_folder(p, {**PEFT_CONFIG, "rank_pattern": [1]}),
         AdapterFormatError, "rank_pattern is list"),
    Case("PEFT config exponential pattern", lambda p: peft_folder(p, {**PEFT_CONFIG, "alpha_pattern": {
        "(a+)+$": 1}}), AdapterFormatError, "repeats a group"),
    Case("PEFT config of another algorithm", lambda p: peft_folder(p, {**PEFT_CONFIG, "peft_type": "LOKR"}),
         AdapterFormatError, "says LOKR but module"),
]


@pytest.mark.parametrize("case", PARSE_CASES, ids=[c.id for c in PARSE_CASES])
def test_refused_while_parsing(case, tmp_path, pipe):
    path = case.build(tmp_path)
    with pytest.raises(case.error, match=case.match) as parsed:
        load_adapter(path)
    assert str(path) in str(parsed.value)  # the file, or for a PEFT folder its weights or config
    with pytest.raises(case.error) as described:  # what `lohakr info` reads: the header alone, no torch
        load_adapter(path, header_only=True)
    assert str(path) in str(described.value)
    before = snapshot(pipe)
    for strict in (False, True):
        with pytest.raises(case.error, match=case.match) as loaded:
            pipe.load_lycoris(path, strict=strict)
        assert str(path) in str(loaded.value)
    assert_untouched(pipe, before)


def test_the_corpus_is_large_enough():
    assert len(PARSE_CASES) + len(LOAD_CASES) >= 40


# -- the corpus: parsed, refused when loaded ---------------------------------------------------------
LOAD_CASES = [
    Case("factor overflow (values 1e20)", lambda p: write(p, loha(LAYER.kohya, value=1e20)),
         NonFiniteUpdateError, "would write NaN/inf: factor overflow"),
    Case("LoKr factor overflow", lambda p: write(p, lokr(LAYER.kohya, value=1e20)), NonFiniteUpdateError,
         "would write NaN/inf: factor overflow"),
    Case("a module larger than any layer (shape bomb)", lambda p: write(p, lokr(LAYER.kohya, w1=(1024, 1024),
                                                                              w2=(512, 512), value=1e-3)),
         BaseModelMismatchError, r"none of the 1 modules fits .* ΔW is \(524288, 524288\)"),
    Case("names of another model", lambda p: write(p, loha("lora_unet_no_such_block_attn", alpha=1.0)),
         NothingToApplyError, "would change nothing"),
    Case("declared SDXL, shapes fit SD1.5", lambda p: write(p, loha(LAYER.kohya), metadata={
        "ss_base_model_version": "sdxl_base_v1-0"}), BaseModelMismatchError, "this is an SDXL adapter"),
    Case("declared SD2 by modelspec", lambda p: write(p, loha(LAYER.kohya), metadata={
        "modelspec.architecture": "stable-diffusion-v2-768-v"}), BaseModelMismatchError, "this is an SD2.x adapter"),
]


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c.id for c in LOAD_CASES])
def test_refused_when_loading(case, tmp_path, pipe):
    path = case.build(tmp_path)
    load_adapter(path)  # parses: the file is well-formed
    before = snapshot(pipe)
    with pytest.raises(case.error, match=case.match) as loaded:
        pipe.load_lycoris(path)
    assert str(path) in str(loaded.value)
    with pytest.raises(LohakrError) as strict:  # strict may refuse earlier, for its own reason
        pipe.load_lycoris(path, strict=True)
    assert str(path) in str(strict.value)
    assert_untouched(pipe, before)


def test_overflow_of_the_weight_dtype_is_refused_only_there(tmp_path, pipe, pipe_fp16):
    """ΔW of about 1e6: finite in float32, inf once added to a float16 weight."""
    path = write(tmp_path, loha(LAYER.kohya, value=30.0, rank=4))
    before = snapshot(pipe_fp16)
    with pytest.raises(NonFiniteUpdateError, match=r"leave float16's range.*Nothing was written") as err:
        pipe_fp16.load_lycoris(path)
    assert str(path) in str(err.value) and LAYER.path in str(err.value)
    assert_untouched(pipe_fp16, before)
    pipe.load_lycoris(path, "big")  # float32 holds it
    assert torch.isfinite(pipe.unet.get_submodule(LAYER.path).weight).all()
    pipe.unload_lycoris("big")


@pytest.mark.parametrize("strength", [math.nan, math.inf, -math.inf, "1", True])
def test_non_finite_or_non_numeric_strengths_are_refused(tmp_path, pipe, strength):
    path = good_file(tmp_path)
    before = snapshot(pipe)
    with pytest.raises(LohakrError, match="a strength is a finite number"):
        pipe.load_lycoris(path, strength=strength)
    with pytest.raises(LohakrError, match="a strength is a finite number"):
        pipe.load_lycoris(path, strength={"unet": strength})
    with pytest.raises(LohakrError, match="a strength is a finite number"):
        pipe.load_lycoris(path, text_encoder_strength=strength)
    assert_untouched(pipe, before)


def test_a_strength_change_that_would_overflow_keeps_everything(tmp_path, pipe):
    pipe.load_lycoris(good_file(tmp_path), "a", strength=0.5)
    try:
        patched = snapshot(pipe)
        with pytest.raises(LohakrError, match="a strength is a finite number"):
            pipe.set_lycoris_strength("a", math.nan)
        with pytest.raises(NonFiniteUpdateError, match=f"{LAYER.path}.*the strength 1e\\+300 times the scale"):
            pipe.set_lycoris_strength("a", 1e300)
        assert [x["strength"]["unet"] for x in pipe.lycoris_adapters()] == [0.5]
        assert all(torch.equal(patched[k], v) for k, v in snapshot(pipe).items())
    finally:
        pipe.unload_lycoris("a")


def test_fused_loads_are_checked_before_anything_is_written(tmp_path):
    fused = make_pipe(tmp_path, fuse=True)
    before = snapshot(fused)
    path = write(tmp_path, loha(LAYER.kohya) | loha(unet_layer(fused, index=1).kohya, value=1e20))
    with pytest.raises(NonFiniteUpdateError, match="factor overflow"):
        fused.load_lycoris(path)
    assert_untouched(fused, before)


# -- duplicates ----------------------------------------------------------------------------------------
def text_encoder_names() -> tuple[str, str]:
    path = "text_model.encoder.layers.0.self_attn.q_proj"
    return "lora_te_" + path.replace(".", "_"), "lora_te_" + path[len("text_model."):].replace(".", "_")


@pytest.mark.parametrize("style", ["kohya SGM", "dotted diffusers", "PEFT dotted", "flattened text encoder"])
def test_a_layer_named_twice_is_patched_once(tmp_path, pipe, style):
    first, second = {
        "kohya SGM": (LAYER.kohya, LAYER.kohya_sgm),
        "dotted diffusers": (LAYER.kohya, f"unet.{LAYER.path}"),
        "PEFT dotted": (LAYER.kohya, f"base_model.model.{LAYER.path}"),
        "flattened text encoder": text_encoder_names(),
    }[style]
    twice = write(tmp_path, loha(first) | loha(second, alpha=1.0), "twice.safetensors")
    first, second = load_adapter(twice).modules  # the file's own order decides which one applies
    once = write(tmp_path, loha(first), "once.safetensors")
    before = snapshot(pipe)
    with pytest.raises(StrictLoadError, match=rf"{second} \[duplicate\] the file also names this layer as {first}"):
        pipe.load_lycoris(twice, strict=True)
    assert_untouched(pipe, before)

    report = pipe.load_lycoris(twice, "twice")
    assert [(o.module, o.status) for o in report.outcomes] == [(first, "applied"), (second, "duplicate")]
    assert "1 duplicate" in report.summary()
    doubled = snapshot(pipe)
    pipe.unload_lycoris("twice")
    pipe.load_lycoris(once, "once")
    single = snapshot(pipe)
    pipe.unload_lycoris("once")
    assert all(torch.equal(single[k], doubled[k]) for k in single)
    assert_untouched(pipe, before)


# -- base model ----------------------------------------------------------------------------------------
def test_a_declared_base_model_mismatch_can_be_overridden(tmp_path, pipe, caplog):
    path = write(tmp_path, loha(LAYER.kohya), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    report = pipe.load_lycoris(path, "forced", allow_base_mismatch=True)
    try:
        assert report.complete
        assert "allow_base_mismatch" in report.warnings[0] and "SDXL adapter" in report.warnings[0]
        assert any("allow_base_mismatch" in r.message for r in caplog.records)
    finally:
        pipe.unload_lycoris("forced")


# -- grad mode and batches ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_patching_does_not_depend_on_grad_mode(kind):
    """ComfyUI may patch with grad enabled on weights that require grad (a fresh process, LoKr first)."""
    tensors = lokr("m") if kind == "lokr" else loha("m")
    module = load_adapter(tensors).modules["m"]
    base = torch.randn(32, 32)
    expected = module.patched_weight(base, 0.7)
    with torch.enable_grad():
        weight = base.clone().requires_grad_()
        got = apply.add_to(weight, module, 0.7)
    assert torch.equal(got.detach(), expected)


def test_a_failing_strength_change_inside_a_batch_undoes_the_batch(tmp_path, pipe):
    first = write(tmp_path, loha(LAYER.kohya), "first.safetensors")
    second = write(tmp_path, lokr(unet_layer(pipe, index=1).kohya.replace("to_q", "to_k")), "second.safetensors")
    pipe.load_lycoris(first, "first", strength=0.5)
    try:
        before = snapshot(pipe)
        with pytest.raises(NonFiniteUpdateError, match="first.safetensors"):
            with pipe.lycoris_batch():
                pipe.load_lycoris(second, "second")
                pipe.set_lycoris_strength("first", 1e300)
        assert [(a["name"], a["strength"]["unet"]) for a in pipe.lycoris_adapters()] == [("first", 0.5)]
        assert all(torch.equal(before[k], v) for k, v in snapshot(pipe).items())
    finally:
        pipe.unload_lycoris()


def test_peft_folder_loads_its_weights_and_config(tmp_path, pipe):
    folder = peft_folder(tmp_path, PEFT_CONFIG)
    adapter = load_adapter(folder)
    module = adapter.modules[f"base_model.model.{LAYER.path}"]
    assert adapter.source == str(folder / "adapter_model.safetensors") and module.scale == 2.0
    report = pipe.load_lycoris(folder, "peft")
    pipe.unload_lycoris("peft")
    assert report.complete


def test_metadata_that_is_not_json_is_ignored_with_a_warning(tmp_path):
    path = write(tmp_path, loha(LAYER.kohya), metadata={"ss_network_args": "{not json"})
    adapter = load_adapter(path)
    assert adapter.metadata.training_args == {}
    assert any(f"{path}: cannot read header field ss_network_args" in w for w in adapter.warnings)


def test_model_weights_beside_adapter_modules_are_not_called_ia3(tmp_path):
    path = write(tmp_path, loha(LAYER.kohya) | {"lora_unet_stray.weight": torch.ones(4),
                                                "lora_unet_ia3.weight": torch.ones(4),
                                                "lora_unet_ia3.on_input": torch.tensor(1)})
    adapter = load_adapter(path)
    assert adapter.skipped == {"lora_unet_stray": "a model's own weight, not an adapter module",
                               "lora_unet_ia3": "unsupported algorithm: IA3"}


def test_info_command_on_a_folder_and_a_checkpoint(tmp_path, capsys):
    from lohakr.loaders.cli import main

    folder = tmp_path / "adapters"
    folder.mkdir()
    write(folder, loha(LAYER.kohya), "inside.safetensors")
    assert main(["info", str(folder)]) == 2
    assert f"error: {folder}: is a folder, not a file" in capsys.readouterr().err
    checkpoint = write(tmp_path, {"model.diffusion_model.out.2.weight": torch.ones(4, 4),
                                  "model.diffusion_model.out.2.bias": torch.ones(4)}, "model.safetensors")
    assert main(["info", str(checkpoint)]) == 2
    assert "this is a model checkpoint, not an adapter" in capsys.readouterr().err


def test_a_bias_delta_for_a_layer_without_bias_is_reported(tmp_path, pipe):
    """attn1.to_q has no bias: the diff applies, and the report says the diff_b did not."""
    path = write(tmp_path, {f"{LAYER.kohya}.diff": torch.full((32, 32), 1e-3),
                            f"{LAYER.kohya}.diff_b": torch.ones(32)})
    report = pipe.load_lycoris(path, "diff")
    try:
        assert any("diff_b is not applied" in w and LAYER.path in w for w in report.warnings)
    finally:
        pipe.unload_lycoris("diff")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_nan_is_found_in_a_file_of_one_dtype(tmp_path, dtype):
    tensors = loha(LAYER.kohya, dtype=dtype)
    tensors[f"{LAYER.kohya}.alpha"] = torch.tensor(1.0, dtype=dtype)
    tensors[f"{LAYER.kohya}.hada_w2_a"][7, 1] = math.inf
    with pytest.raises(AdapterFormatError, match="hada_w2_a contains 1 NaN/inf value"):
        load_adapter(write(tmp_path, tensors))


def test_a_nan_outside_the_factors_does_not_refuse_the_file(tmp_path):
    tensors = loha(LAYER.kohya) | {"bundle_emb.style.string_to_param.*": torch.full((2, 8), math.nan)}
    adapter = load_adapter(write(tmp_path, tensors))
    assert list(adapter.modules) == [LAYER.kohya] and "bundle_emb" in adapter.skipped
