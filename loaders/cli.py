"""Command line: ``python -m lohakr info FILE`` (and ``demo``, see ``lohakr.loaders.demo``)."""

from __future__ import annotations

import argparse
import json
import sys

from .adapter import load_adapter
from .describe import describe_adapter, describe_coverage, format_coverage, format_description
from .errors import LohakrError


def _info(args: argparse.Namespace) -> int:
    adapter = load_adapter(args.file)
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
    print(format_description(description))
    if coverage is not None:
        print()
        print(format_coverage(coverage))
    elif args.model == "auto":
        print("\n(base model unknown: pass --model sdxl or --model sd1 to see the coverage)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


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
    try:
        from .demo import add_demo_arguments
    except ImportError:  # pragma: no cover
        add_demo_arguments = None
    if add_demo_arguments is not None:
        demo = sub.add_parser("demo", help="patch a tiny SDXL pipeline with LoHa and LoKr, save a grid")
        add_demo_arguments(demo)
        demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LohakrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
