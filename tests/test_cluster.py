"""tritlm on a real local Ray instance (2 CPUs, no dashboard, nothing leaving the machine): 2
replicas of the bundled model behind Ray Serve's HTTP proxy on 127.0.0.1, driven by the official
`openai` client; then one replica's process killed while it streams."""

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from tritlm import LLM, cluster  # noqa: E402
from tritlm.api import default_model_path  # noqa: E402

APP = "tritlm"
CTX = 512  # the bundled model's
GREEDY = dict(temperature=0, max_tokens=12)
NO_EOS = {"ignore_eos": True}
MODEL = os.path.basename(default_model_path())
TIMEOUT = 60  # seconds: every client call, every wait


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


@pytest.fixture(scope="module")
def ray_metrics_port():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves the machine
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def base_url(ray_metrics_port):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(cluster.deployment(threads=1, replicas=2, n_ctx=CTX, max_batch=8, max_tokens=16),
              name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def oracle():
    return LLM(n_ctx=CTX)


def both_replicas(client) -> set[str] | None:
    """The replicas that answered 8 requests sent at once (their X-Replica headers), if both did
    (Serve sends each request to the less busy; None while the proxy does not know of one yet)."""
    def one(i):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], **GREEDY, extra_body=NO_EOS)
        assert raw.parse().usage.completion_tokens == 12
        return raw.headers["x-replica"]
    with ThreadPoolExecutor(8) as pool:
        answered = set(pool.map(one, range(8)))
    return answered if len(answered) == 2 else None


def running_replicas() -> int:
    states = serve.status().applications[APP].deployments[APP].replica_states
    return states.get("RUNNING", 0) if set(states) == {"RUNNING"} else 0


# ----------------------------------------------------------------- without Ray running


def test_a_model_path_missing_on_a_node_is_named_with_the_node():
    with pytest.raises(ValueError, match=rf"/no/such/model.gguf: no such file on node {socket.gethostname()}"):
        cluster.local_model("/no/such/model.gguf")
    assert cluster.local_model(None) is None  # the bundled model
    assert cluster.local_model(default_model_path()) == default_model_path()


def test_deployment_options_are_checked():
    with pytest.raises(ValueError, match="not both"):
        cluster.deployment(replicas=2, max_replicas=3)
    with pytest.raises(ValueError, match="needs max_replicas"):
        cluster.deployment(min_replicas=2)
    with pytest.raises(TypeError, match="n_ctxx"):
        cluster.deployment(n_ctxx=64)
    with pytest.raises(ValueError, match="threads"):
        cluster.deployment(threads=0)


def test_serve_ray_refuses_more_threads_than_cores(monkeypatch, capsys):
    from tritlm.cli import main

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert main(["serve", "--ray", "--replicas", "2", "-t", "2"]) == 2
    assert "2 replica(s) of 2 thread(s) need more CPUs than this machine's 2" in capsys.readouterr().err


# ------------------------------------------------------------------------- the API


def test_chat_and_completions_streamed_and_not(client, oracle):
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": "def fibonacci"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    expected = oracle.create_chat_completion(messages, **GREEDY)
    assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert reply.usage.model_dump(exclude_none=True) == expected["usage"]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage == reply.usage

    done = client.completions.create(model=MODEL, prompt="import os", **GREEDY)
    assert done.choices[0].text == oracle.generate("import os", **GREEDY)
    streamed = client.completions.create(model=MODEL, prompt="import os", stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    long = client.completions.create(model=MODEL, prompt="import os", **GREEDY, extra_body=NO_EOS)
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 12


def test_both_replicas_answer(client):
    wait_for(lambda: both_replicas(client), "both replicas to answer")


def test_metrics_per_replica_and_in_rays_prometheus(base_url, client, ray_metrics_port):
    wait_for(lambda: both_replicas(client), "both replicas to generate")
    seen = {}
    with httpx.Client(base_url=base_url, timeout=TIMEOUT) as http:
        def scrape():  # /metrics of whichever replica Serve picks, until both have answered
            response = http.get("/metrics")
            seen[response.headers["x-replica"]] = response.text
            return len(seen) == 2
        wait_for(scrape, "/metrics from both replicas")
    for text in seen.values():
        assert "# TYPE tritlm_completion_tokens_total counter" in text

    def exported():  # Ray's Prometheus endpoint: every replica's counters, tagged with the replica
        text = httpx.get(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=TIMEOUT).text
        lines = [line for line in text.splitlines() if line.startswith("ray_tritlm_completion_tokens_total{")]
        return lines if all(f'replica="{r}"' in "".join(lines) for r in seen) else None
    lines = wait_for(exported, "the replicas' metrics in Ray's Prometheus endpoint")
    assert all(f'application="{APP}"' in line and float(line.rsplit(" ", 1)[1]) > 0 for line in lines)
    text = httpx.get(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=TIMEOUT).text
    assert "# TYPE ray_tritlm_slots_total gauge" in text  # a gauge keeps its name


def test_health_through_the_proxy(base_url):
    health = httpx.get(base_url + "/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["slots_total"] == 8


# ------------------------------------------------------------------ a replica dies


def test_a_replica_killed_mid_stream_is_replaced(client):
    """8 long streams, on both replicas (8 slots each); once every one is under way, the first
    one's replica is killed. Its streams end at once, cut short; the others finish; Serve starts
    a new replica, and the next requests are answered by both."""
    n, long = 8, CTX - 16  # tokens: seconds of streaming
    started, replica_of, results = threading.Barrier(n + 1, timeout=TIMEOUT), {}, {}

    def stream(i):
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt=f"# {i}", max_tokens=long, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=NO_EOS)
        replica_of[i], finish, tokens, error = raw.headers["x-replica"], None, None, None
        chunks = iter(raw.parse())
        next(chunks)
        started.wait()
        try:
            for chunk in chunks:
                finish = finish or (chunk.choices[0].finish_reason if chunk.choices else None)
                tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        except (openai.APIError, httpx.HTTPError) as e:
            error = e
        results[i] = finish, tokens, error

    workers = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(n)]
    for worker in workers:
        worker.start()
    started.wait()
    victim = replica_of[0]
    # Serve names a replica's actor "SERVE_REPLICA::<app>#<deployment>#<replica>"
    [actor] = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + victim)]
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    for worker in workers:
        worker.join(TIMEOUT)
    assert not any(worker.is_alive() for worker in workers), "a stream hung"

    on_victim = [i for i in range(n) if replica_of[i] == victim]
    assert 0 < len(on_victim) < n
    for i in range(n):
        finish, tokens, error = results[i]
        if i in on_victim:  # cut short: an error, or a stream that ends without its last chunk
            assert error is not None or finish is None, results[i]
        else:
            assert (finish, tokens, error) == ("length", long, None)

    wait_for(lambda: victim not in str(ray.util.list_named_actors(all_namespaces=True))
             and running_replicas() == 2, "Serve to replace the replica", timeout=2 * TIMEOUT)
    answered = wait_for(lambda: both_replicas(client), "the new replica to answer")
    assert victim not in answered
