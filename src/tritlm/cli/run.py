"""`tritlm run`: generate from a prompt, or chat (-cnv), with bitnet.cpp's run_inference.py flags."""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    from . import add_device_argument, add_model_source, add_weight_arguments

    p = subparsers.add_parser(
        "run", help="generate text from a prompt, or chat with -cnv",
        description="Generate a continuation of a prompt, printing tokens as they come, then "
                    "the prompt and generation speed. With -cnv, -p is the system prompt and "
                    "the session is an interactive chat: Ctrl-C stops a reply, Ctrl-D or an empty "
                    "line ends it; the oldest turns are dropped when the chat outgrows the context.")
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file, Hugging Face model directory or Hub id org/repo[:FILE] (default: "
                        "the tiny model bundled with tritlm, trained on Python's standard library)")
    add_model_source(p)
    p.add_argument("-p", "--prompt", default="", help="prompt (with -cnv: the system prompt)")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: every core that other work leaves idle)")
    add_device_argument(p)
    add_weight_arguments(p)
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size (default 2048, or the model's own if shorter)")
    p.add_argument("-temp", "--temperature", type=float, default=0.8, help="temperature; 0 is greedy (default 0.8)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed (same seed, same text)")
    p.add_argument("-cnv", "--conversation", action="store_true", help="chat mode")
    speculative = p.add_mutually_exclusive_group()
    speculative.add_argument("--lookup", type=int, nargs="?", const=8, default=None, metavar="N",
                             help="prompt-lookup speculative decoding: each step also checks up to N "
                                  "(default 8) guesses copied from earlier text; the model's own output, "
                                  "faster where it repeats the prompt")
    speculative.add_argument("--draft", default=None, metavar="MODEL",
                             help="speculative decoding with a draft model: a smaller model with the same "
                                  "tokenizer (path or Hub id) proposes up to 8 guesses a step, run by the "
                                  "same engine (loaded with the same -c, -t and --device)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import LLM

    if args.n_predict < 1:
        raise ValueError("-n must be at least 1")
    if args.lookup is not None and args.lookup < 1:
        raise ValueError("--lookup N needs N of at least 1")
    llm = LLM(args.model, n_ctx=args.ctx_size or _default_ctx(args.model), n_threads=args.threads,
              device=args.device, draft_model=args.draft, weight_layout=args.weight_layout,
              mmap=args.mmap)
    sampling = dict(temperature=args.temperature, seed=args.seed)
    if args.lookup:
        sampling |= dict(speculative="lookup", max_guesses=args.lookup)
    elif args.draft:
        sampling |= dict(speculative="draft")
    if not args.conversation:
        if not args.prompt:
            raise ValueError("give a prompt with -p (or chat with -cnv)")
        print(args.prompt, end="", flush=True)
        for piece in llm.stream(args.prompt, max_tokens=args.n_predict, **sampling):
            print(piece, end="", flush=True)
        print()
        report(llm.timings)
        return 0
    messages = [{"role": "system", "content": args.prompt}] if args.prompt else []
    print(f"Chatting with {llm.model_name} ({llm.n_ctx} tokens of context). Ctrl-C stops a reply; "
          "Ctrl-D, Ctrl-C or an empty line here exits.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not user.strip():
            return 0
        try:
            messages, dropped = llm.fit_chat(messages + [{"role": "user", "content": user}], args.n_predict)
        except ValueError as e:
            print(f"tritlm: {e}; say something shorter, or start with a larger -c", file=sys.stderr)
            continue
        if dropped:
            print(f"(the {dropped} oldest messages no longer fit the context and were dropped)", file=sys.stderr)
        reply = ""
        try:
            for piece in llm.stream(llm.chat_prompt(messages), max_tokens=args.n_predict, **sampling):
                print(piece, end="", flush=True)
                reply += piece
        except KeyboardInterrupt:  # stops this reply only; what it said so far stays in the chat
            print(" [stopped]", end="")
        print()
        report(llm.timings)
        messages.append({"role": "assistant", "content": reply})


def _default_ctx(model) -> int | None:
    """2048, or the model's trained context when it is shorter (None: the bundled model's own)."""
    import json
    import os

    from ..formats.gguf import GGUFFile
    from ..models import loader

    if model is None:
        return None
    try:
        if os.path.isdir(model):
            with open(os.path.join(model, "config.json")) as f:
                context = loader.hf_config(json.load(f)).context_length
        else:
            with GGUFFile(model) as f:
                context = loader.gguf_config(f.metadata, f.tensors).context_length
    except (OSError, ValueError, RecursionError):  # (json.load: a config.json nested too deeply)
        return 2048  # loading the model will name the problem
    return min(2048, context)


def report(t: dict) -> None:
    """Speeds to stderr, so stdout holds only the text."""
    prefill = t["prefill_tokens"] / t["prefill_seconds"] if t["prefill_seconds"] else 0.0
    decode = (t["generated_tokens"] - 1) / t["decode_seconds"] if t["generated_tokens"] > 1 else 0.0
    print(f"\nprompt: {t['prompt_tokens']} tokens ({t['prefill_tokens']} computed) at {prefill:.1f} tokens/s"
          f" | generated: {t['generated_tokens']} tokens at {decode:.1f} tokens/s"
          + (f" | speculative: {t['accepted_tokens']}/{t['proposed_tokens']} guesses accepted"
             if "proposed_tokens" in t else ""), file=sys.stderr)
