"""Command line: ``python -m lohakr info FILE`` (and ``demo``, see ``lohakr.loaders.demo``)."""

from __future__ import annotations

import argparse
import json
import sys

from .adapter import load_adapter
from .describe import describe_adapter, describe_coverage, format_coverage, format_description
from .errors import LohakrError


def _info(args: argparse.Namespace) -> int:
    adapter = load_adapter(args.file, header_only=True)  # no torch: a description in well under a second
    description = describe_adapter(adapter, top_tags=args.tags)
    family = args.model
    if family == "auto":
        family = adapter.base_model if adapter.base_model in ("sdxl", "sd1") else None
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
        print("\n(base model unknown: pass --model sdxl or --model sd1 to see the coverage)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from safetensors.torch import save_file

    from .convert import convert_adapter, format_conversion
    from .reference_models import reference_layout

    adapter = load_adapter(args.file)
    family = args.model if args.model != "auto" else adapter.base_model
    if family not in ("sdxl", "sd1"):
        raise LohakrError(f"{adapter.source}: the base model is {adapter.base_model_name}; pass --model sdxl or sd1")
    rank = args.rank if args.rank == "exact" else int(args.rank)
    conversion = convert_adapter(adapter, reference_layout(family), rank, args.max_error, args.dtype)
    out = os.path.abspath(args.output)
    if os.path.abspath(adapter.source) == out:
        raise LohakrError(f"{out}: the output would overwrite the input; choose another path")
    handle, temporary = tempfile.mkstemp(suffix=".safetensors", dir=os.path.dirname(out))
    os.close(handle)
    try:  # written beside the target, then renamed: a killed conversion leaves no partial file
        save_file(conversion.tensors, temporary, conversion.metadata)
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    print(f"{adapter.source} -> {out} (kohya LoRA, {family})")
    print(format_conversion(conversion))
    return 0


def _demo(options: list[str]) -> int:
    from .demo import add_demo_arguments, run_demo

    parser = argparse.ArgumentParser(prog="python -m lohakr demo",
                                     description="Patch a tiny SDXL pipeline with a LoHa and a LoKr; save a picture.")
    add_demo_arguments(parser)
    return run_demo(parser.parse_args(options))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lohakr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what an adapter file is and how it covers SDXL / SD1.5")
    info.add_argument("file", help="a .safetensors LoHa/LoKr/LyCORIS file")
    info.add_argument("--model", choices=["auto", "sdxl", "sd1", "none"], default="auto",
                      help="layout to check coverage against (default: the detected base model)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--tags", type=int, default=10, help="how many top trigger tags to show")
    info.set_defaults(run=_info)
    convert = sub.add_parser("convert", help="a LoHa/LoKr file as a LoRA file: exact where the rank allows, else SVD")
    convert.add_argument("file", help="a .safetensors LoHa/LoKr/LyCORIS file")
    convert.add_argument("--to", choices=["lora"], default="lora", help="the output format (kohya LoRA)")
    convert.add_argument("--rank", default="exact",
                         help="'exact' (default: every module exactly) or the largest rank to store; a module whose "
                              "exact rank is larger gets a truncated SVD")
    convert.add_argument("--max-error", type=float, default=None,
                         help="with SVD, the smallest rank whose relative Frobenius error is at most this")
    convert.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                         help="stored dtype (default: the input's)")
    convert.add_argument("--model", choices=["auto", "sdxl", "sd1"], default="auto",
                         help="the base model whose layers the file targets (default: detected)")
    convert.add_argument("-o", "--output", required=True, help="the LoRA file to write")
    convert.set_defaults(run=_convert)
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
