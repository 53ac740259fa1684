"""`tritlm info MODEL`: metadata, the tensor table and an integrity check."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np


def add_parser(subparsers) -> None:
    from . import add_model_source

    p = subparsers.add_parser("info", help="show a model's metadata, tensors and integrity",
                              description="Print a GGUF file's or Hugging Face directory's metadata, "
                                          "a table of its tensors (name, type, shape, bytes) and the "
                                          "result of loading it: declared sizes against the file, "
                                          "all-zero ternary matrices.")
    p.add_argument("model", help="GGUF file, Hugging Face model directory or Hub id org/repo[:FILE]")
    add_model_source(p)
    p.add_argument("--sha256", action="store_true",
                   help="also print the sha256 of the weight file(s), to compare with the Hub's")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats.gguf import GGUFFile
    from ..formats.hf import HFCheckpoint, is_hf_directory
    from ..models import loader
    from ..tokenizer import Tokenizer

    if is_hf_directory(args.model):
        ckpt = HFCheckpoint(args.model)
        metadata = ckpt.config
        infos = [ckpt.info(name) for name in ckpt.names]
        rows = [(i.name, i.dtype, i.shape, i.end - i.begin) for i in infos]
        ckpt.close()
    elif os.path.isfile(args.model):
        with GGUFFile(args.model) as f:
            metadata = f.metadata
            rows = [(t.name, t.type_name, t.shape, t.nbytes) for t in f.tensors.values()]
    else:
        raise ValueError(f"{args.model}: no such model file or Hugging Face directory")

    print("metadata:")
    for key, value in metadata.items():
        print(f"  {key} = {_short(value)}")
    print(f"\ntensors: {len(rows)}, {sum(r[3] for r in rows) / 1e6:.1f} MB")
    width = max((len(r[0]) for r in rows), default=4)
    print(f"  {'name':<{width}}  {'type':<6}  {'shape':<16}  bytes")
    for name, kind, shape, nbytes in rows:
        print(f"  {name:<{width}}  {kind:<6}  {str(tuple(shape)):<16}  {nbytes}")

    if args.sha256:
        from ..hub import sha256_file, weight_files

        print()
        for path in weight_files(args.model):
            print(f"sha256: {sha256_file(path)}  {path}")
    print("\nintegrity:", end=" ")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # what tritlm.LLM loads: the configuration, every tensor's shape, the tokenizer
            config, _, metadata = loader.load(args.model)
            Tokenizer.of_model(args.model, metadata, config.vocab_size)
        except ValueError as e:
            print("FAILED", flush=True)
            print(f"tritlm: error: {e}", file=sys.stderr)
            return 1
    for w in caught:
        print(f"\n  WARNING: {w.message}", end="")
    print(f"{'' if not caught else chr(10) + '  '}loads as {config.arch}: {config.n_layers} layers, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}")
    return 1 if caught else 0


def _short(value) -> str:
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 8:
        return f"[{len(value)} items: {', '.join(map(repr, list(value[:3])))}, ...]"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
