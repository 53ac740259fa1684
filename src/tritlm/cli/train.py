"""`tritlm train`: train a small ternary model on text files and export it (GGUF + HF)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Train a BitNet b1.58 model (the BitNet-2B-4T architecture, at the size you choose) on text
files or folders, with quantization-aware training whose forward is exactly tritlm's inference
arithmetic, then export it as a GGUF file (I2_S) and a Hugging Face directory (OUT/hf) that
tritlm and transformers both load. Needs PyTorch: pip install 'tritlm[train]'.

Folders are searched recursively for files matching --include. A deterministic --eval-fraction
of the files (chosen by a hash of each file's path) is held out: its loss is reported as
training goes, and its text is written to OUT/heldout.txt for `tritlm perplexity`. Without
--tokenizer a byte-level BPE (Llama-3 split regex, <|begin_of_text|>, <|end_of_text|>,
<|eot_id|>) of --vocab-size tokens is trained on the training files.

The learning rate follows BitNet b1.58's two-stage schedule: linear warm-up to --lr, cosine
decay; at --cooldown-start (a fraction of training) an abrupt drop to --cooldown-lr, cosine
decay to zero, and weight decay switched off. With --time-limit the schedule runs on the clock
and training stops when the time is up (or at --steps, whichever comes first).

OUT holds checkpoint.pt (every --checkpoint-interval steps; continue with --resume -o OUT),
the tokenizer, train_log.jsonl, heldout.txt, model.gguf (or --gguf PATH) and hf/.

The defaults (4 layers, hidden 256, FFN 768, 4 heads over 2 KV heads, 4096-token vocabulary,
context 256: 4.2M parameters, a 3 MB GGUF) train in under an hour on two CPU cores."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a small ternary model on text files",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("data", nargs="*", help="text files or folders (not needed with --resume)")
    d.add_argument("-o", "--out", default="tritlm-model", help="output directory (default: %(default)s)")
    d.add_argument("--gguf", default=None, help="where to write the GGUF (default: OUT/model.gguf)")
    d.add_argument("--include", nargs="+", default=["*"],
                   help="file name patterns to take from folders, e.g. '*.py' (default: every file)")
    d.add_argument("--exclude", nargs="+", default=None,
                   help="path patterns to skip (default: */site-packages/* */__pycache__/* */.*)")
    d.add_argument("--eval-fraction", type=float, default=0.02,
                   help="fraction of files held out for evaluation (default: %(default)s)")
    d.add_argument("--tokenizer", default=None,
                   help="directory with a byte-level BPE tokenizer.json (default: train one)")
    d.add_argument("--vocab-size", type=int, default=4096,
                   help="vocabulary of the trained tokenizer (default: %(default)s)")
    m = p.add_argument_group("model (hidden and FFN sizes: multiples of 128)")
    m.add_argument("--hidden", type=int, default=256, help="hidden size (default: %(default)s)")
    m.add_argument("--ffn", type=int, default=768, help="FFN size (default: %(default)s)")
    m.add_argument("--layers", type=int, default=4, help="layers (default: %(default)s)")
    m.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    m.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default: %(default)s)")
    m.add_argument("-c", "--ctx", type=int, default=512,
                   help="context length trained on (default: %(default)s)")
    m.add_argument("--rope-theta", type=float, default=10000.0, help="RoPE base (default: %(default)s)")
    t = p.add_argument_group("training")
    t.add_argument("-b", "--batch", type=int, default=8, help="windows per step (default: %(default)s)")
    t.add_argument("--steps", type=int, default=None,
                   help="optimizer steps; 0 with --time-limit: as many as fit (default: 2000)")
    t.add_argument("--time-limit", type=float, default=None,
                   help="minutes of training; the schedule follows the clock (default: none)")
    t.add_argument("--lr", type=float, default=3e-3, help="stage-1 peak learning rate (default: %(default)s)")
    t.add_argument("--cooldown-lr", type=float, default=1e-3,
                   help="stage-2 learning rate after the drop (default: %(default)s)")
    t.add_argument("--cooldown-start", type=float, default=0.5,
                   help="fraction of training where stage 2 starts (default: %(default)s)")
    t.add_argument("--warmup", type=int, default=100, help="warm-up steps (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay in stage 1 (default: %(default)s)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (default: %(default)s)")
    t.add_argument("--eval-interval", type=int, default=200, help="steps between evals (default: %(default)s)")
    t.add_argument("--checkpoint-interval", type=int, default=200,
                   help="steps between checkpoints (default: %(default)s)")
    t.add_argument("-t", "--threads", type=int, default=None, help="PyTorch threads (default: every core)")
    t.add_argument("-s", "--seed", type=int, default=0, help="random seed (default: %(default)s)")
    t.add_argument("--name", default="tritlm", help="general.name of the GGUF (default: %(default)s)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its checkpoint with its saved options "
                        "(--steps and --time-limit, if given, set new totals)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        from ..train import TrainOptions, train
    except ImportError as e:
        raise ValueError(str(e)) from None

    if not args.resume and not args.data:
        raise ValueError("give the training text: files or folders")
    options = TrainOptions(
        data=list(args.data), out_dir=args.out, include=args.include,
        eval_fraction=args.eval_fraction, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        hidden_size=args.hidden, intermediate_size=args.ffn, n_layers=args.layers,
        n_heads=args.heads, n_kv_heads=args.kv_heads, context_length=args.ctx,
        rope_theta=args.rope_theta, batch_size=args.batch,
        steps=2000 if args.steps is None else args.steps,
        time_limit=args.time_limit, lr=args.lr, cooldown_lr=args.cooldown_lr,
        cooldown_start=args.cooldown_start, warmup=args.warmup, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval, seed=args.seed, threads=args.threads,
        gguf=args.gguf, name=args.name)
    if args.exclude is not None:
        options.exclude = args.exclude
    try:
        train(options, resume=args.resume, steps=args.steps, time_limit=args.time_limit)
    except KeyboardInterrupt:
        return 130  # the checkpoint is saved; `tritlm train --resume -o OUT` continues
    return 0
