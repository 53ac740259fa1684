"""`tritlm convert`: a Hugging Face BitNet checkpoint to a GGUF file bitnet.cpp and llama.cpp read."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from . import add_model_source

    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face checkpoint to GGUF",
        description="Write a Hugging Face BitNet / ternary Llama checkpoint (bf16 master weights "
                    "or packed) as a GGUF file with its tokenizer: I2_S for bitnet.cpp, TQ2_0 or "
                    "TQ1_0 for llama.cpp.")
    p.add_argument("model", help="Hugging Face model directory, or Hub id org/repo")
    add_model_source(p)
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    p.add_argument("--type", default="I2_S", choices=["I2_S", "TQ2_0", "TQ1_0"],
                   help="ternary layout (default I2_S)")
    p.add_argument("--embedding", default="F16", choices=["F16", "F32"],
                   help="token embedding type (default F16)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats.hf import is_hf_directory
    from ..models import export, loader
    from ..tokenizer import Tokenizer

    if not is_hf_directory(args.model):
        raise ValueError(f"{args.model}: not a Hugging Face model directory (no config.json)")
    config, tensors = loader.load_hf(args.model)
    metadata = Tokenizer.from_hf(args.model).gguf_metadata()
    export.write_gguf_model(args.output, config, tensors, ternary_type=args.type,
                            embedding_type=args.embedding, extra_metadata=metadata)
    print(f"wrote {args.output}: {config.arch}, {config.n_layers} layers, {args.type} weights")
    return 0
