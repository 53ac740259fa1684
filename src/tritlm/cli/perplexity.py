"""`tritlm perplexity`: a model's perplexity on a text file, measured as llama-perplexity does."""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    from . import add_device_argument, add_model_source

    p = subparsers.add_parser(
        "perplexity", help="perplexity of a model on a text file",
        description="Perplexity as llama.cpp's llama-perplexity measures it: the text is cut "
                    "into windows of -c tokens, each starting with BOS, and only the second half "
                    "of each window is scored (so every scored token sees at least c/2 tokens of "
                    "context). Prints the running perplexity per batch, then the final value "
                    "± its standard error.")
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file, Hugging Face model directory or Hub id org/repo[:FILE] "
                        "(default: the bundled tiny model)")
    add_model_source(p)
    p.add_argument("-f", "--file", required=True, help="text file to score")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="window length in tokens (default: 512, or the model's context if smaller)")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="tokens per forward pass, a multiple of -c (default: one window)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: every core that other work leaves idle)")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import LLM

    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{args.file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{args.file}: not UTF-8 text") from None
    llm = LLM(args.model, n_threads=args.threads, device=args.device)

    def progress(done, total, ppl):
        print(f"[{done}/{total}] {ppl:.4f}", file=sys.stderr, flush=True)

    ppl, err = llm.perplexity(text, args.ctx_size, batch_size=args.batch_size, progress=progress)
    print(f"perplexity: {ppl:.4f} +/- {err:.4f}")
    return 0
