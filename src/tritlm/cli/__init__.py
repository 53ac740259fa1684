"""The `tritlm` command. Each subcommand lives in its own module with `add_parser(subparsers)`,
which registers it and sets `func`, the function that runs it."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from . import bench, convert, dummy, embed, info, perplexity, pull, run, serve, train
from . import list as list_models

SUBCOMMANDS = (run, info, convert, dummy, bench, train, perplexity, embed, serve, pull, list_models)


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), or cuda: the GPU engine (pip install 'tritlm[cuda]')")


def add_weight_arguments(parser) -> None:
    """The CPU engine's weight options: their layout, and memory-mapping them."""
    parser.add_argument("--weight-layout", choices=["tiles", "tiles5"], default=None,
                        help="the CPU kernels' weight layout: 2-bit tiles or 1.6-bit tiles5, a fifth smaller "
                             "(default: the faster here)")
    parser.add_argument("--mmap", action="store_true",
                        help="map the packed weights from a cache file written at the first load (beside the "
                             "model or in ~/.cache/tritlm/weights) instead of copying them into memory: later "
                             "starts are instant, and a model larger than the memory runs (GGUF files)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritlm", description="Ternary LLMs on the CPU.")
    parser.add_argument("--version", action="version", version=f"tritlm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand. A user's mistake (bad input, a file that can't be read or written)
    ends in one `tritlm: error:` line, never a traceback; so do Ctrl-C and a closed pipe."""
    args = build_parser().parse_args(argv)
    try:
        # a Hub id -> its local path; for `serve --ray`, each replica resolves it on its own node
        if getattr(args, "model", None) and not getattr(args, "ray", False):
            from ..hub import resolve_model

            args.model = resolve_model(args.model, revision=args.revision, offline=args.offline)
        return args.func(args) or 0
    except ValueError as e:
        return _error(e)
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # `tritlm run ... | head`: the reader has all it wants
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no flush error at exit)
            return 0
        return _error(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _error(message) -> int:
    print(f"tritlm: error: {message}", file=sys.stderr)
    return 2


def add_model_source(parser) -> None:
    """--revision and --offline, for the subcommands whose model may be a Hub id."""
    parser.add_argument("--revision", default=None,
                        help="with a Hub id: the branch, tag or commit (default: main)")
    parser.add_argument("--offline", action="store_true",
                        help="load a Hub model from the cache only, never the network (also: HF_HUB_OFFLINE=1)")
