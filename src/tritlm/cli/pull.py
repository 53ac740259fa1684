"""`tritlm pull REPO[:FILE]`: fetch a model from the Hugging Face Hub into its cache, so it can run
offline after."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pull", help="download a model from the Hugging Face Hub into its cache",
        description="Download a model from the Hugging Face Hub into the Hub cache (HF_HOME, shared "
                    "with other tools) and check its weights' sha256, then print its local path. "
                    "From a repo of GGUF files, one file: the only one, or the one REPO:FILE names "
                    "by file name or type (REPO:i2_s). From a Hugging Face checkpoint, only what "
                    "loading needs. `tritlm run -m REPO` then loads it with no network (--offline).")
    p.add_argument("reference", metavar="REPO[:FILE]", help="Hub model id, e.g. microsoft/bitnet-b1.58-2B-4T-gguf")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..hub import fetch

    print(fetch(args.reference, revision=args.revision))
    return 0
