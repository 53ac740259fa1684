"""The `tritlm` command. Each subcommand lives in its own module with `add_parser(subparsers)`,
which registers it and sets `func`, the function that runs it."""

from __future__ import annotations

import argparse
import sys

from . import bench, convert, dummy, info, perplexity, run, serve, train

SUBCOMMANDS = (run, info, convert, dummy, bench, train, perplexity, serve)


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), or cuda: the GPU engine (pip install 'tritlm[cuda]')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritlm", description="Ternary LLMs on the CPU.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as e:
        print(f"tritlm: error: {e}", file=sys.stderr)
        return 2
