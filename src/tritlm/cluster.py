"""tritlm on a Ray cluster: replicas of the `tritlm serve` app behind Ray Serve's HTTP proxy (the
`[cluster]` extra). Each replica is a Ray actor that loads the model on its node and serves the
same FastAPI app as `tritlm serve` (`create_app`: the OpenAI endpoints, /health, /metrics), its
lifespan starting the continuous-batching scheduler. Serve routes each request to a replica,
replaces replicas that die or fail their health check, and scales their number between bounds.

`deployment(model, threads=..., replicas=...)` is the application, to run with `serve.run` or to
compose into a larger one; `build` is the same for a Serve config file or KubeRay's RayService
(`import_path: tritlm.cluster:build`). `tritlm serve --ray` runs it from the command line.
See docs/CLUSTER.md."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import socket

from ray import serve
from ray.serve import metrics as serve_metrics

from . import hub
from .api import LLM
from .server import create_app

METRICS_PERIOD = 5.0  # seconds between updates of the Ray metrics (Ray exports them every few seconds)
_LLM_OPTIONS = set(inspect.signature(LLM).parameters) - {"model_path", "n_threads"}
_APP_OPTIONS = set(inspect.signature(create_app).parameters) - {"llm"}
_APP_DEFAULTS = {k: p.default for k, p in inspect.signature(create_app).parameters.items()}


def deployment(model: str | None = None, *, threads: int = 1, replicas: int | None = None,
               min_replicas: int | None = None, max_replicas: int | None = None,
               target_ongoing_requests: float | None = None, revision: str | None = None,
               offline: bool = False, name: str = "tritlm", serve_options: dict | None = None,
               **options):
    """A Ray Serve application of `model` (a path that exists on every node, a Hub id fetched by
    each replica into its node's Hub cache, or None: the bundled model; `revision`, `offline` as
    for `tritlm.hub.resolve_model`). Each replica runs `threads` engine threads and reserves as
    many CPUs (`num_cpus`; a GPU too with device="cuda").

    Either `replicas` (default 1), or autoscaling between `min_replicas` and `max_replicas` aiming
    at `target_ongoing_requests` requests per replica (default: its slots, `max_batch`, so that
    replicas are added when requests wait). Serve sends a replica what `tritlm serve` would take,
    `max_batch` running and `max_queue` waiting (so /health and /metrics are answered however busy
    its slots are); when every replica is that full, `max_queue` more wait at each proxy, and
    beyond that the proxy answers 429 with Retry-After: 1, as `tritlm serve` does.

    options: `LLM`'s keyword arguments (n_ctx, kv_type, device, draft_model, weight_layout, mmap)
    and `create_app`'s (max_batch, max_queue, allowed_hosts, max_tokens, temperature, ...), with
    `tritlm serve`'s defaults for api_key (TRITLM_API_KEY in the replica's environment) and
    ctx_per_slot (n_ctx if given, else the model's context up to 2048).
    serve_options: any other `serve.deployment` option (health_check_period_s,
    max_replicas_per_node, ...); they win over those set here."""
    unknown = set(options) - _LLM_OPTIONS - _APP_OPTIONS
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}: give LLM's or create_app's "
                        "keyword arguments, or serve_options")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    llm_options = {k: v for k, v in options.items() if k in _LLM_OPTIONS}
    app_options = {k: v for k, v in options.items() if k in _APP_OPTIONS}
    max_batch = app_options.get("max_batch", _APP_DEFAULTS["max_batch"])
    max_queue = app_options.get("max_queue", _APP_DEFAULTS["max_queue"])
    if (min_replicas, max_replicas, target_ongoing_requests) == (None, None, None):
        scaling = {"num_replicas": 1 if replicas is None else replicas}
    elif replicas is not None:
        raise ValueError("give replicas, or min_replicas/max_replicas/target_ongoing_requests, not both")
    elif max_replicas is None:
        raise ValueError("autoscaling needs max_replicas")
    else:
        scaling = {"autoscaling_config": {"min_replicas": 1 if min_replicas is None else min_replicas,
                                          "max_replicas": max_replicas,
                                          "target_ongoing_requests": target_ongoing_requests or max_batch}}
    gpu = {"num_gpus": 1} if llm_options.get("device", "cpu") != "cpu" else {}
    settings = scaling | {
        "name": name, "ray_actor_options": {"num_cpus": threads} | gpu,
        "max_ongoing_requests": max_batch + max_queue, "max_queued_requests": max_queue,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "health_check_period_s": 2,  # a cheap check: a dead replica is replaced within seconds
    } | (serve_options or {})
    return Replica.options(**settings).bind(model, revision, offline, threads, llm_options, app_options)


def build(args: dict):
    """The application for a Serve config file or a KubeRay RayService: `import_path:
    tritlm.cluster:build`, `args:` `deployment`'s keyword arguments (model, threads, replicas, ...)."""
    return deployment(**args)


def local_model(model: str | None, *, revision: str | None = None, offline: bool = False) -> str | None:
    """The path of `model` on this node: a Hub id fetched into (or found in) this node's Hub cache, a
    path as it is; a path that does not exist here is an error naming the node."""
    path = hub.resolve_model(model, revision=revision, offline=offline)
    if path is not None and not os.path.exists(path):
        raise ValueError(f"{path}: no such file on node {node_name()}; a model given by path must exist "
                         "at that path on every node that runs a replica (or give a Hub id: each "
                         "replica then fetches it into its node's Hub cache)")
    return path


def node_name() -> str:
    import ray.util

    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"


@serve.deployment
@serve.ingress()
class Replica:
    """One engine with its scheduler, serving `create_app`'s app (built on the replica, after the
    model is loaded: `__serve_build_asgi_app__`). Every response names the replica that made it
    in an `X-Replica` header (the `replica` tag of its Ray metrics)."""

    def __init__(self, model, revision, offline, threads, llm_options, app_options):
        self.llm = LLM(local_model(model, revision=revision, offline=offline), n_threads=threads, **llm_options)
        self.llm_options, self.app_options = llm_options, app_options
        self.replica = serve.get_replica_context().replica_tag

    async def __serve_build_asgi_app__(self):
        # slots of tritlm serve's default context: -c if given, else the model's up to 2048 tokens
        ctx = (self.app_options.get("ctx_per_slot") or self.llm_options.get("n_ctx")
               or min(self.llm.n_ctx, 2048))
        # the key, as `tritlm serve`'s: else TRITLM_API_KEY, here from the replica's environment
        api_key = self.app_options.get("api_key") or os.environ.get("TRITLM_API_KEY") or None
        app = create_app(self.llm, **self.app_options | {"ctx_per_slot": ctx, "api_key": api_key})
        app.add_middleware(_NameReplica, replica=self.replica.encode())
        self.scheduler = app.state.scheduler
        self._metrics = asyncio.create_task(_export_metrics(app.state.metrics))  # held: tasks are weakly referenced
        # what is loaded lives as long as the replica: spare the collector walking it (as `tritlm serve`)
        gc.freeze()
        return app

    def check_health(self):
        """Serve calls this every few seconds: a replica whose engine thread died is replaced."""
        if not self.scheduler.alive:
            raise RuntimeError(f"replica {self.replica}: the engine thread has stopped (see its log)")


class _NameReplica:
    """ASGI middleware: an `X-Replica` header on every response."""

    def __init__(self, app, replica: bytes):
        self.app, self.header = app, (b"x-replica", replica)

    async def __call__(self, scope, receive, send):
        async def named(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, named if scope["type"] == "http" else send)


async def _export_metrics(families):
    """The replica's /metrics, copied every METRICS_PERIOD seconds into Ray's metrics, which Ray
    exports to Prometheus as `ray_tritlm_*` (counters with `_total`) with Serve's `deployment`,
    `replica` and `application` tags."""
    exported, last = {}, {}
    while True:
        for name, kind, help, samples in families():
            counter = kind == "counter"
            for labels, value in samples:
                if name not in exported:
                    make = serve_metrics.Counter if counter else serve_metrics.Gauge
                    # Ray's exporter adds _total to a counter's name
                    exported[name] = make(f"tritlm_{name.removesuffix('_total') if counter else name}",
                                          description=help, tag_keys=tuple(labels))
                tags = {k: str(v) for k, v in labels.items()}
                if counter:  # Ray's counters only go up, by increments
                    key = (name, tuple(tags.items()))
                    value, last[key] = value - last.get(key, 0), value
                    if value > 0:
                        exported[name].inc(value, tags)
                else:
                    exported[name].set(value, tags)
        await asyncio.sleep(METRICS_PERIOD)
