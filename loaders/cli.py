"""Command line: ``python -m lohakr info FILE``, ``convert``, ``merge``, ``bake`` (and ``demo``, see
``lohakr.loaders.demo``)."""

from __future__ import annotations

import argparse
import json
import sys

from .adapter import load_adapter
from .describe import describe_adapter, describe_coverage, format_coverage, format_description
from .errors import LohakrError

# the full-size layouts ``info`` checks coverage against (reference_models.FAMILIES, without importing it)
REFERENCE_FAMILIES = ("sdxl", "sd1", "flux1", "chroma", "flux2", "sd3", "zimage", "qwenimage")


def _info(args: argparse.Namespace) -> int:
    adapter = load_adapter(args.file, header_only=True)  # no torch: a description in well under a second
    description = describe_adapter(adapter, top_tags=args.tags)
    family = args.model
    if family == "auto":
        family = adapter.base_model if adapter.base_model in REFERENCE_FAMILIES else None
    coverage = None
    if family and family != "none":
        from .reference_models import reference_layout

        coverage = describe_coverage(adapter, reference_layout(family))
    if args.json:
        json.dump({"adapter": description, "coverage": coverage}, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    for warning in (coverage or {}).get("warnings", []):  # before anything else: it changes the reading
        print(f"warning: {warning}")
    print(format_description(description))
    if coverage is not None:
        print()
        print(format_coverage(coverage, with_warnings=False))
    elif args.model == "auto":
        print(f"\n(base model unknown: pass --model with one of {', '.join(REFERENCE_FAMILIES)} to see the coverage)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_adapter, format_conversion

    adapter = load_adapter(args.file)
    family = _family(args.model, [adapter])
    conversion = convert_adapter(adapter, _layout(family), _rank(args.rank), args.max_error, args.dtype)
    out = conversion.write(args.output, [adapter.source])
    print(f"{adapter.source} -> {out} ({_style(family)}, {family})")
    print(format_conversion(conversion))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .bake import BakeAdapter
    from .convert import format_conversion, merge_adapters

    specs = [BakeAdapter.parse(spec) for spec in args.files]
    for spec in specs:
        if spec.block_weights:
            raise LohakrError(f"{spec.path}: merge takes FILE[:STRENGTH]; block weights are not merged into a LoRA")
    adapters = [(load_adapter(spec.path), spec.strength) for spec in specs]
    family = _family(args.model, [a for a, _ in adapters])
    merged = merge_adapters(adapters, _layout(family), _rank(args.rank), args.max_error, args.dtype)
    out = merged.write(args.output, [a.source for a, _ in adapters])
    print(f"{len(adapters)} adapters -> {out} ({_style(family)}, {family}; load it at strength 1 for the stack)")
    print(format_conversion(merged))
    return 0


def _family(model: str, adapters) -> str:
    family = model if model != "auto" else adapters[0].base_model
    if family not in REFERENCE_FAMILIES:
        raise LohakrError(f"{adapters[0].source}: the base model is {adapters[0].base_model_name}; "
                          f"pass --model with one of {', '.join(REFERENCE_FAMILIES)}")
    return family


def _style(family: str) -> str:
    return "kohya LoRA" if family in ("sdxl", "sd1") else "diffusers/PEFT LoRA"


def _layout(family: str):
    from .reference_models import reference_layout

    return reference_layout(family)


def _rank(rank: str) -> int | str:
    if rank == "exact":
        return rank
    try:
        return int(rank)
    except ValueError:
        raise LohakrError(f"--rank {rank!r}: give 'exact' or a positive integer") from None


def _bake(args: argparse.Namespace) -> int:
    from .bake import BakeAdapter, bake

    def progress(items, total):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return items
        return tqdm(items, total=total, desc="lohakr bake", leave=False, disable=not sys.stderr.isatty())

    result = bake(args.base, [BakeAdapter.parse(spec) for spec in args.adapter], args.output,
                  allow_base_mismatch=args.allow_base_mismatch, progress=progress)
    print(result.format())
    return 0


def _demo(options: list[str]) -> int:
    from .demo import add_demo_arguments, run_demo

    parser = argparse.ArgumentParser(prog="python -m lohakr demo",
                                     description="Patch a tiny SDXL pipeline with a LoHa and a LoKr; save a picture.")
    add_demo_arguments(parser)
    return run_demo(parser.parse_args(options))


def _lora_output_options(parser: argparse.ArgumentParser, dtype_default: str, model_default: str) -> None:
    """The options of commands that write a LoRA file (``convert``, ``merge``)."""
    parser.add_argument("--rank", default="exact",
                        help="'exact' (default: every module exactly, unless --max-error) or the largest rank to "
                             "store; a module whose exact rank is larger gets a truncated SVD")
    parser.add_argument("--max-error", type=float, default=None,
                        help="cut each module by SVD at the smallest rank whose relative Frobenius error, after the "
                             "cast to --dtype, is at most this (never above --rank)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                        help=f"stored dtype (default: {dtype_default})")
    parser.add_argument("--model", choices=["auto", *REFERENCE_FAMILIES], default="auto",
                        help=f"the base model whose layers the files target, at its full size (default: "
                             f"{model_default}); kohya names for sdxl/sd1, diffusers/PEFT names for transformers")
    parser.add_argument("-o", "--output", required=True, help="the LoRA file to write")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lohakr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what an adapter file is and how it covers SDXL / SD1.5")
    info.add_argument("file", help="a .safetensors LoHa/LoKr/LyCORIS file")
    info.add_argument("--model", choices=["auto", *REFERENCE_FAMILIES, "none"], default="auto",
                      help="layout to check coverage against (default: the detected base model)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--tags", type=int, default=10, help="how many top trigger tags to show")
    info.set_defaults(run=_info)
    convert = sub.add_parser("convert", help="a LoHa/LoKr file as a LoRA file: exact where the rank allows, else SVD")
    convert.add_argument("file", help="a .safetensors LoHa/LoKr/LyCORIS file")
    convert.add_argument("--to", choices=["lora"], default="lora", help="the output format (kohya LoRA)")
    _lora_output_options(convert, "the input's", "detected")
    convert.set_defaults(run=_convert)
    merge = sub.add_parser("merge", help="several adapters as one LoRA file: exact where the summed ranks allow, "
                           "else SVD")
    merge.add_argument("files", nargs="+", metavar="FILE[:STRENGTH]", help="the adapters and their strengths")
    _lora_output_options(merge, "the first file's", "detected from the first file")
    merge.set_defaults(run=_merge)
    bake = sub.add_parser("bake", help="adapters merged into a copy of a diffusers model folder or an SD1.x/SDXL "
                                       "single-file checkpoint, streamed")
    bake.add_argument("base", help="a diffusers model folder (unet/, text_encoder/, text_encoder_2/) or a single-file "
                                   "checkpoint with original keys (.safetensors)")
    bake.add_argument("--adapter", action="append", required=True, metavar="FILE[:STRENGTH[:BLOCKWEIGHTS]]",
                      help="an adapter to bake, at a strength (default 1) and block weights; repeat for a stack")
    bake.add_argument("--allow-base-mismatch", action="store_true",
                      help="bake what fits of an adapter made for another base model")
    bake.add_argument("-o", "--output", required=True, help="the folder to write (must not exist)")
    bake.set_defaults(run=_bake)
    # The demo's own options are parsed when it runs: its module imports torch and diffusers, which
    # `info` does without (a description in well under a second).
    demo = sub.add_parser("demo", add_help=False, help="patch a tiny SDXL pipeline with LoHa and LoKr, save a picture "
                          "(python -m lohakr demo --help for its options)")
    demo.add_argument("options", nargs=argparse.REMAINDER)
    demo.set_defaults(run=lambda args: _demo(args.options))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["demo"]:  # every option (--help too) is the demo's own
            return _demo(argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except LohakrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
