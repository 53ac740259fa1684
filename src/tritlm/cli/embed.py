"""`tritlm embed`: embeddings of a file's lines, written as a NumPy .npy array."""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    from . import add_device_argument, add_model_source

    p = subparsers.add_parser(
        "embed", help="embed the lines of a text file into a .npy array",
        description="Embed each line of a text file (one text per line) with the model's pooling "
                    "(the mean of the final hidden states, or the last token's, as the model "
                    "says), and write them as a float32 NumPy array [lines, dimensions] (np.load "
                    "reads it). Vectors are unit length unless --no-normalize. Texts are run "
                    "--batch-size at a time; a text longer than the context keeps its first tokens.")
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file, Hugging Face model directory or Hub id org/repo[:FILE] "
                        "(default: the bundled tiny model)")
    add_model_source(p)
    p.add_argument("-f", "--file", required=True, help="text file, one text per line; - reads standard input")
    p.add_argument("-o", "--output", required=True, help="the .npy file to write")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--dimensions", type=int, default=None,
                   help="keep the first D values of each vector (Matryoshka style), normalised after")
    p.add_argument("--no-normalize", action="store_true", help="leave the vectors unnormalised")
    p.add_argument("--no-truncate", action="store_true",
                   help="a text longer than the context is an error (default: keep its first tokens)")
    p.add_argument("-p", "--prompt", default=None, help='text put before every line (e.g. "query: ")')
    p.add_argument("--prompt-name", default=None,
                   help="one of the model's named prompts (config_sentence_transformers.json), e.g. query")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size: the most tokens of a text (default: the model's, at most 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: every core that other work leaves idle)")
    add_device_argument(p)
    p.set_defaults(func=run)


def read_lines(path: str) -> list[str]:
    """The file's lines (standard input for "-"), each a text: none may be empty."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{path}: no lines to embed")
    empty = next((i for i, line in enumerate(lines) if not line), None)
    if empty is not None:
        raise ValueError(f"{path}: line {empty + 1} is empty (one text per line)")
    return lines


def run(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from ..api import LLM

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    texts = read_lines(args.file)
    llm = LLM(args.model, n_ctx=args.ctx_size, n_threads=args.threads, device=args.device)
    with tqdm(total=len(texts), unit="text", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        vectors = llm.embed(texts, batch_size=args.batch_size, normalize=not args.no_normalize,
                            truncate=not args.no_truncate, prompt=args.prompt, prompt_name=args.prompt_name, dimensions=args.dimensions,
                            progress=lambda done, total: bar.update(done - bar.n))
    with open(args.output, "wb") as f:  # np.save would add ".npy" to a name without it
        np.save(f, vectors)
    print(f"tritlm: wrote {len(vectors)} embeddings of {vectors.shape[1]} dimensions to {args.output}",
          file=sys.stderr)
    return 0
