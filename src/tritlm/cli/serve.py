"""`tritlm serve`: the OpenAI-compatible server, with bitnet.cpp's run_inference_server.py flags."""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    from . import add_model_source

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a web chat page",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                    "/v1/completions, /v1/embeddings, /v1/models), with /health, /metrics and a "
                    "web chat page at /. Requests are batched continuously: every running request "
                    "advances in the same pass over the weights. Needs the [server] extra.")
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file, Hugging Face model directory or Hub id org/repo[:FILE] "
                        "(default: the bundled model)")
    add_model_source(p)
    p.add_argument("-p", "--prompt", default=None, help="system prompt for chats that have none")
    p.add_argument("-n", "--n-predict", type=int, default=512,
                   help="max_tokens of requests that give none; -1: until the context is full (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: every core)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size (default: 2048, or the model's if shorter)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="temperature of requests that give none (default 0.8)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: the TRITLM_API_KEY "
                        "environment variable, else none)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences run at once: the slots (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait for a slot; beyond that requests get 429 (default 64)")
    p.add_argument("--ctx-per-slot", type=int, default=None,
                   help="context of each slot: prompt + completion (default: -c)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take, queueing included; 0: no limit (default 600)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    try:
        import uvicorn

        from ..server import create_app
    except ImportError as e:
        raise ValueError(f"the server needs the [server] extra: pip install 'tritlm[server]' ({e})") from e
    from ..api import LLM

    if args.n_predict == 0 or args.n_predict < -1:
        raise ValueError("-n must be positive, or -1")
    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError("--max-batch must be at least 1 and --max-queue at least 0")
    llm = LLM(args.model, n_ctx=args.ctx_size, n_threads=args.threads)
    ctx = args.ctx_per_slot or args.ctx_size or min(llm.n_ctx, 2048)
    if ctx > llm.n_ctx:
        raise ValueError(f"--ctx-per-slot {ctx} exceeds the context size {llm.n_ctx}")
    app = create_app(llm, api_key=args.api_key or os.environ.get("TRITLM_API_KEY") or None,
                     max_batch=args.max_batch, max_queue=args.max_queue, ctx_per_slot=ctx,
                     max_tokens=args.n_predict, temperature=args.temperature, system_prompt=args.prompt,
                     timeout=args.timeout or None)
    print(f"tritlm: serving {llm.model_name} on http://{args.host}:{args.port}/ "
          f"({args.max_batch} slots of {ctx} tokens)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
