"""`tritlm serve`: the OpenAI-compatible server, with bitnet.cpp's run_inference_server.py flags."""

from __future__ import annotations

import sys

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
RAY_FLAGS = ("--address", "--replicas", "--min-replicas", "--max-replicas", "--target-ongoing-requests")
APP_NAME = "tritlm"  # the Ray Serve application's name


def add_parser(subparsers) -> None:
    from . import add_device_argument, add_model_source, add_weight_arguments

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
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads (default: every core that other work leaves idle); with --ray, each "
                        "replica's, and the CPUs Ray reserves for it (default: this machine's cores "
                        "divided among the replicas)")
    add_device_argument(p)
    add_weight_arguments(p)
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
    p.add_argument("--max-body-bytes", type=int, default=256 * 1024,
                   help="largest request body taken; larger ones get 413 (default 262144: 256 KiB)")
    p.add_argument("--read-timeout", type=float, default=60.0,
                   help="seconds a client has to send a whole request, head and body, from when it "
                        "connects (or its previous response ended); then the connection is closed (default 60)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated host names the Host header may carry, '*' for any (default: "
                        "localhost,127.0.0.1,[::1] when listening on a loopback address without an API "
                        "key, against DNS rebinding; else any)")
    speculative = p.add_mutually_exclusive_group()
    speculative.add_argument("--lookup", type=int, nargs="?", const=8, default=0, metavar="N",
                             help="prompt-lookup speculative decoding for every request that does not opt "
                                  "out (\"speculative\": false): each step also verifies up to N (default 8) "
                                  "guesses copied from earlier text, in the same pass as the other requests' "
                                  "tokens; the model's own output, faster where it repeats the prompt "
                                  "(default: off)")
    speculative.add_argument("--draft", default=None, metavar="MODEL",
                             help="speculative decoding with a draft model for every request that does not "
                                  "opt out: a smaller model with the same tokenizer (path or Hub id), run in "
                                  "a sequence per slot, proposes up to 8 guesses a step (loaded with the "
                                  "same -c, -t and --device)")
    ray = p.add_argument_group("a Ray cluster (--ray; the [cluster] extra; docs/CLUSTER.md)")
    ray.add_argument("--ray", action="store_true",
                     help="serve replicas of this server on a Ray cluster, behind Ray Serve's HTTP proxy on "
                          "--host/--port; each replica loads the model on its node (a Hub id is fetched there)")
    ray.add_argument("--address", default=None,
                     help="the Ray cluster to join: auto (the one `ray start` started here) or HOST:PORT "
                          "(default: start one on this machine, for as long as this command runs)")
    ray.add_argument("--replicas", type=int, default=None, help="replicas of the server (default 1)")
    ray.add_argument("--min-replicas", type=int, default=None,
                     help="autoscaling instead of --replicas: at least this many replicas (default 1)")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling: at most this many replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling: the requests per replica to scale towards (default: --max-batch)")
    p.set_defaults(func=run)


def allowed_hosts(host: str, api_key: str | None, given: str | None) -> list[str] | None:
    """The Host header names to answer to (None: any). A key-less server on a loopback address
    trusts whoever can reach it, so it must not be reachable by another name: a web page whose
    host name its attacker points at 127.0.0.1 (DNS rebinding) would send its own."""
    import ipaddress

    if given is not None:
        return [h.strip() for h in given.split(",") if h.strip()]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    return list(LOOPBACK_HOSTS) if loopback and api_key is None else None


def run(args) -> int:
    import gc
    import os

    try:
        import uvicorn

        from ..server import create_app, uvicorn_options
    except ImportError as e:
        raise ValueError(f"the server needs the [server] extra: pip install 'tritlm[server]' ({e})") from e
    from ..api import LLM

    if args.n_predict == 0 or args.n_predict < -1:
        raise ValueError("-n must be positive, or -1")
    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError("--max-batch must be at least 1 and --max-queue at least 0")
    if args.lookup < 0:
        raise ValueError("--lookup N needs N of at least 0")
    if args.max_body_bytes < 1 or not args.read_timeout > 0:
        raise ValueError("--max-body-bytes must be at least 1 and --read-timeout positive")
    api_key = args.api_key or os.environ.get("TRITLM_API_KEY") or None
    hosts = allowed_hosts(args.host, api_key, args.allowed_hosts)
    if hosts == []:
        raise ValueError("--allowed-hosts names no host ('*' allows any)")
    if args.ray:
        return run_ray(args, api_key, hosts)
    given = [flag for flag in RAY_FLAGS if getattr(args, flag.lstrip("-").replace("-", "_")) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --ray")
    llm = LLM(args.model, n_ctx=args.ctx_size, n_threads=args.threads, device=args.device,
              weight_layout=args.weight_layout, mmap=args.mmap, draft_model=args.draft)
    ctx = args.ctx_per_slot or args.ctx_size or min(llm.n_ctx, 2048)
    if ctx > llm.n_ctx:
        raise ValueError(f"--ctx-per-slot {ctx} exceeds the context size {llm.n_ctx}")
    app = create_app(llm, api_key=api_key, allowed_hosts=hosts, max_body_bytes=args.max_body_bytes,
                     max_batch=args.max_batch, max_queue=args.max_queue, ctx_per_slot=ctx,
                     max_tokens=args.n_predict, temperature=args.temperature, system_prompt=args.prompt,
                     timeout=args.timeout or None,
                     speculative="lookup" if args.lookup else "draft" if args.draft else None,
                     max_guesses=args.lookup or 8)
    print(f"tritlm: serving {llm.model_name} on http://{args.host}:{args.port}/ "
          f"({args.max_batch} slots of {ctx} tokens)", file=sys.stderr)
    if not llm.can_generate:
        print("tritlm: this model makes embeddings (/v1/embeddings); it cannot generate text, so "
              "chat and completion requests get 400", file=sys.stderr)
    # what is loaded now lives as long as the server: spare the collector walking it (100 ms here)
    # on every full collection, which a request body of many small JSON arrays can set off
    gc.freeze()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    **uvicorn_options(read_timeout=args.read_timeout))
    finally:
        gc.unfreeze()
    return 0


def run_ray(args, api_key: str | None, hosts: list[str] | None) -> int:
    """`serve --ray`: the same app, as replicas under Ray Serve (tritlm.cluster), until Ctrl-C or
    SIGTERM; then the application is deleted (and the Ray instance this command started stops)."""
    import logging
    import os
    import signal
    import threading

    try:
        import ray
        from ray import serve

        from ..cluster import deployment
    except ImportError as e:
        raise ValueError(f"--ray needs the [cluster] extra: pip install 'tritlm[cluster]' ({e})") from e
    initial = args.replicas or args.min_replicas or 1
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // (args.max_replicas or initial))
    if args.address is None and threads * initial > cores:
        raise ValueError(f"{initial} replica(s) of {threads} thread(s) need more CPUs than this machine's "
                         f"{cores}: lower -t or the replicas")
    app = deployment(args.model, threads=threads, replicas=args.replicas, min_replicas=args.min_replicas,
                     max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                     revision=args.revision, offline=args.offline, name=APP_NAME,
                     n_ctx=args.ctx_size, device=args.device, weight_layout=args.weight_layout, mmap=args.mmap,
                     draft_model=args.draft, api_key=api_key, allowed_hosts=hosts,
                     max_body_bytes=args.max_body_bytes, max_batch=args.max_batch, max_queue=args.max_queue,
                     ctx_per_slot=args.ctx_per_slot, max_tokens=args.n_predict, temperature=args.temperature,
                     system_prompt=args.prompt, timeout=args.timeout or None,
                     speculative="lookup" if args.lookup else "draft" if args.draft else None,
                     max_guesses=args.lookup or 8,
                     serve_options={"logging_config": {"enable_access_log": False}})  # as uvicorn's, off
    # a Ray instance just for this server sends no usage reports, and has no dashboard (for one:
    # `ray start --head`, then --address auto)
    if args.address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=args.address or "local", include_dashboard=False if args.address is None else None,
             logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())  # (Ctrl-C: KeyboardInterrupt)
        print(f"tritlm: starting {initial} replica(s) of {threads} thread(s) on Ray", file=sys.stderr)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica could not start: the last line of Serve's message says why
            status = serve.status().applications.get(APP_NAME)
            why = [d.message.strip().splitlines()[-1] for d in status.deployments.values()
                   if d.message.strip()] if status else []
            raise ValueError(f"the deployment failed: {why[0] if why else e}") from None
        print(f"tritlm: serving on http://{args.host}:{args.port}/ through Ray Serve", file=sys.stderr)
        stopped.wait()
    finally:
        if args.address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)  # the cluster and its other applications go on
        ray.shutdown()
    return 0
