"""`tritlm dummy`: a model with random ternary weights at a real model's shape, for benchmarks."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from ..bench.dummy import EMBEDDING_PRESETS, EMBEDDING_TYPES, PRESETS

    p = subparsers.add_parser(
        "dummy", help="write a random-weight model for benchmarks",
        description="Write a GGUF model with random ternary weights: bitnet.cpp's dummy presets "
                    "the exact BitNet-b1.58-2B-4T shape, or the BitNet-embedding shapes (0.6B-embed: Qwen3, "
                    "270M-embed: Gemma3). Tensors are written one at a time, so "
                    "a model larger than memory can be made.")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    p.add_argument("--preset", default="2B4T", choices=[*PRESETS, *EMBEDDING_PRESETS],
                   help="model shape (default 2B4T)")
    p.add_argument("--arch", default="bitnet-b1.58", choices=["bitnet-b1.58", "bitnet"],
                   help="architecture name (llama.cpp knows only 'bitnet'; default bitnet-b1.58; the "
                        "embedding presets have their own)")
    p.add_argument("--type", default="I2_S", choices=["I2_S", "TQ2_0", "TQ1_0"],
                   help="ternary layout (default I2_S)")
    p.add_argument("--embedding", default="F16", choices=list(EMBEDDING_TYPES),
                   help="token embedding type (default F16)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.dummy import write_dummy

    c = write_dummy(args.output, args.preset, arch=args.arch, ternary_type=args.type,
                    embedding_type=args.embedding, seed=args.seed, progress=True)
    print(f"wrote {args.output}: {args.preset} ({c.n_layers} layers, hidden {c.hidden_size}, "
          f"ffn {c.intermediate_size}), {args.type} weights, {args.embedding} embedding")
    return 0
