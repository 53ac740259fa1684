"""The OpenAI-compatible server, driven by the official `openai` client over loopback, on a tiny
model built here; the scheduler on its own; the web chat page in headless Chromium."""

import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from tiny_models import write_bitnet, write_tokenizer

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402

from tritlm import LLM  # noqa: E402
from tritlm.cli import build_parser, main  # noqa: E402
from tritlm.sampling import SamplingParams  # noqa: E402
from tritlm.server import Job, Scheduler, create_app, uvicorn_options  # noqa: E402

CTX = 128
GREEDY = dict(temperature=0, max_tokens=12)
NO_EOS = {"ignore_eos": True}  # the random model may end a turn at any token


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    write_bitnet(directory, "autobitlinear")
    write_tokenizer(directory)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    assert main(["convert", str(directory), "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def draft_path(tmp_path_factory):
    """A smaller, different model with the same tokenizer: a draft for the tiny model."""
    directory = tmp_path_factory.mktemp("draft")
    write_bitnet(directory, "autobitlinear", seed=1, num_hidden_layers=1)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def oracle(gguf_path):
    """A separate LLM: what the server must reproduce."""
    return LLM(gguf_path, n_ctx=CTX)


@contextmanager
def serving(app, **options):
    """Run the app with uvicorn, as `tritlm serve` configures it (options: of `uvicorn_options`),
    on a free loopback port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **uvicorn_options(**options)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def base_url(gguf_path):
    llm = LLM(gguf_path, n_ctx=CTX)
    with serving(create_app(llm, max_batch=4, max_queue=8, max_tokens=16)) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(base_url, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(base_url + "/health").json()
        if health["slots_busy"] == 0 and health["queue"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.02)


# ------------------------------------------------------------------------- the API


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list()] == ["tiny.gguf"]
    assert client.models.retrieve("tiny.gguf").id == "tiny.gguf"
    health = httpx.get(base_url + "/health").json()
    assert health["status"] == "ok" and health["slots_total"] == 4


def test_chat_matches_the_library(client, oracle):
    messages = [{"role": "user", "content": "def fibonacci"}]
    reply = client.chat.completions.create(model="tiny.gguf", messages=messages, **GREEDY)
    expected = oracle.create_chat_completion(messages, **GREEDY)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == expected["choices"][0]["message"]["content"]
    assert choice.finish_reason == expected["choices"][0]["finish_reason"]
    assert reply.usage.model_dump(exclude_none=True) == expected["usage"]


def test_chat_stream_with_usage(client):
    messages = [{"role": "user", "content": "The quick"}]
    whole = client.chat.completions.create(model="tiny.gguf", messages=messages, **GREEDY, extra_body=NO_EOS)
    chunks = list(client.chat.completions.create(model="tiny.gguf", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY,
                                                 extra_body=NO_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage == whole.usage
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completions_stream_and_not(client, oracle):
    done = client.completions.create(model="tiny.gguf", prompt="The quick", **GREEDY, extra_body=NO_EOS)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.choices[0].text == oracle.generate("The quick", **GREEDY)
    assert done.usage.prompt_tokens == len(oracle.tokenize("The quick")) and done.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="tiny.gguf", prompt="The quick", stream=True, **GREEDY,
                                            extra_body=NO_EOS))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None
    ids = oracle.tokenize("The quick")  # a prompt of token ids gives the same text
    assert client.completions.create(model="tiny.gguf", prompt=ids, **GREEDY, extra_body=NO_EOS).choices[0].text \
        == done.choices[0].text


def test_stop_strings(client):
    full = client.completions.create(model="tiny.gguf", prompt="The quick", **GREEDY,
                                     extra_body=NO_EOS).choices[0].text
    stop = full[4:7]
    cut = client.completions.create(model="tiny.gguf", prompt="The quick", stop=[stop], **GREEDY, extra_body=NO_EOS)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny.gguf", prompt="The quick", stop=stop, stream=True, **GREEDY,
                                         extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


WIDE = dict(temperature=100.0, top_p=1.0, max_tokens=16)  # the random model is too sure at T <= 2


def test_seed_reproducibility(client):
    def text(seed):
        return client.completions.create(model="tiny.gguf", prompt="The quick", seed=seed, **WIDE,
                                         extra_body=NO_EOS).choices[0].text
    assert text(3) == text(3) != text(4)


def test_n_choices(client):
    many = client.completions.create(model="tiny.gguf", prompt="The quick", n=3, seed=5, **WIDE, extra_body=NO_EOS)
    assert [c.index for c in many.choices] == [0, 1, 2]
    texts = [c.text for c in many.choices]
    assert len(set(texts)) == 3 and many.usage.completion_tokens == 48
    again = client.completions.create(model="tiny.gguf", prompt="The quick", n=3, seed=5, **WIDE, extra_body=NO_EOS)
    assert [c.text for c in again.choices] == texts
    stream = client.chat.completions.create(model="tiny.gguf", messages=[{"role": "user", "content": "hi"}],
                                            n=2, stream=True, **GREEDY, extra_body=NO_EOS)
    by_index = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            by_index[choice.index] += choice.delta.content or ""
    assert by_index[0] == by_index[1] != ""  # greedy: the same text twice


def test_logprobs(client):
    reply = client.chat.completions.create(model="tiny.gguf", messages=[{"role": "user", "content": "hi"}],
                                           logprobs=True, top_logprobs=3, **GREEDY, extra_body=NO_EOS)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 12 and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.logprob <= 0 and e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)  # greedy
    legacy = client.completions.create(model="tiny.gguf", prompt="The quick", logprobs=2, **GREEDY, extra_body=NO_EOS)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert "".join(lp.tokens) == legacy.choices[0].text


def test_embeddings(client, oracle):
    texts = ["The quick brown fox", "def fibonacci(n):"]
    floats = client.embeddings.create(model="tiny.gguf", input=texts, encoding_format="float")
    packed = client.embeddings.create(model="tiny.gguf", input=texts)  # the client asks for base64
    assert [d.index for d in floats.data] == [0, 1]
    for text, a, b in zip(texts, floats.data, packed.data):
        ids = oracle.tokenize(text)
        mean = oracle.engine.hidden_states(oracle.engine.new_sequence(len(ids)), ids).mean(axis=0)
        np.testing.assert_allclose(a.embedding, mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.embedding, a.embedding, rtol=1e-6)
        assert np.linalg.norm(a.embedding) == pytest.approx(1, abs=1e-5)
    assert floats.usage.prompt_tokens == sum(len(oracle.tokenize(t)) for t in texts)


def test_hidden_states_feed_the_head(oracle):
    """Engine.hidden_states is what the LM head reads: applied to it, the head gives the logits."""
    from tritlm import ops

    engine, ids = oracle.engine, oracle.tokenize("The quick brown fox")
    hidden = engine.hidden_states(engine.new_sequence(CTX), ids)
    logits = engine.forward([(engine.new_sequence(CTX), ids)], all_logits=True)[0]
    head = engine.head
    np.testing.assert_array_equal(ops.head_matmul(hidden, head.data, head.rows, head.type), logits)


# ------------------------------------------------------------------------- errors


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


BAD = [  # body, status, param
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": "2"}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({}, 400, "messages"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi " * 300}]}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "42"}]}, 400, "messages"),  # the format has no tool role
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": "7"}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 17}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 7}, 400, "stop"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_requests_get_openai_errors(base_url, client, body, status, param):
    error = error_of(httpx.post(base_url + "/v1/chat/completions", json=body), status)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert client.completions.create(model="tiny.gguf", prompt="hi", max_tokens=2).choices  # still serving


def test_more_bad_requests(base_url, client):
    post = lambda path, **kw: httpx.post(base_url + path, **kw)  # noqa: E731
    assert error_of(post("/v1/chat/completions", content=b"{not json",
                         headers={"content-type": "application/json"}), 400)["code"] == "invalid_json"
    assert error_of(post("/v1/completions", json={"prompt": list(range(CTX + 5))}), 400)["code"] \
        == "context_length_exceeded"
    assert error_of(post("/v1/completions", json={"prompt": [10**6]}), 400)["param"] == "prompt"
    assert error_of(post("/v1/completions", json={"prompt": "hi", "stop": ["", "x"]}), 400)["param"] == "stop"
    assert error_of(post("/v1/embeddings", json={"input": ""}), 400)["param"] == "input"
    assert error_of(post("/v1/embeddings", json={"input": "hi", "dimensions": 129}), 400)["param"] == "dimensions"
    assert error_of(httpx.get(base_url + "/v1/nothing"), 404)
    assert error_of(httpx.get(base_url + "/v1/chat/completions"), 405)
    assert error_of(httpx.get(base_url + "/v1/models/other"), 404)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny.gguf", prompt="hi", max_tokens=-1)
    assert wait_idle(base_url)["slots_busy"] == 0
    assert client.completions.create(model="tiny.gguf", prompt="hi", max_tokens=2).choices


def test_metrics(base_url, client):
    client.completions.create(model="tiny.gguf", prompt="hi", max_tokens=3, extra_body=NO_EOS)
    text = httpx.get(base_url + "/metrics").text
    for name in ("http_requests_total", "completion_tokens_total", "prompt_tokens_total", "queue_depth",
                 "batch_size", "tokens_per_second", "slots_total"):
        assert f"# TYPE tritlm_{name} " in text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["tritlm_completion_tokens_total"] >= 3
    assert values['tritlm_http_requests_total{route="/v1/completions",status="200"}'] >= 1


def test_api_key_is_enforced(gguf_path):
    llm = LLM(gguf_path, n_ctx=CTX)
    with serving(create_app(llm, api_key="s3cret", max_batch=1)) as url:
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        error = error_of(httpx.post(url + "/v1/completions", json={"prompt": "hi"}), 401)
        assert error["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert right.completions.create(model="tiny.gguf", prompt="hi", max_tokens=2).choices
        assert httpx.get(url + "/health").status_code == 200  # for load balancers


# ----------------------------------------------- hostile and broken requests, class by class


def raw(body) -> dict:
    """httpx arguments posting `body` as JSON that may hold what JSON can't (Infinity, NaN, a lone
    surrogate), as Python's json module writes it."""
    return {"content": json.dumps(body), "headers": {"content-type": "application/json"}}


def test_any_integer_is_a_seed(base_url):
    """OpenAI takes any integer: a negative seed killed the engine thread (every request after it
    hung); a seed is taken modulo 2**64."""
    def text(seed):
        response = httpx.post(base_url + "/v1/completions", timeout=20,
                              json={"prompt": "The quick", "seed": seed, **WIDE, **NO_EOS})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    assert text(-1) == text(-1) == text(2**64 - 1)
    assert text(2**80) == text(2**80 % 2**64) and text(-(2**70)) == text(-(2**70) % 2**64)
    assert httpx.get(base_url + "/health").json()["status"] == "ok"


NON_FINITE = [("temperature", float("inf")), ("temperature", float("nan")), ("top_p", float("nan")),
              ("repeat_penalty", float("inf")), ("min_p", float("nan")), ("presence_penalty", float("-inf"))]


@pytest.mark.parametrize("param, value", NON_FINITE)
def test_sampling_values_must_be_finite(base_url, param, value):
    body = {"messages": [{"role": "user", "content": "hi"}], param: value, "max_tokens": 2}
    assert error_of(httpx.post(base_url + "/v1/chat/completions", **raw(body)), 400)["param"] == param


def stream_text(http, body) -> str:
    """The text of a streamed completion; fails on an error event."""
    text = ""
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
    return text


def test_a_tiny_temperature_poisons_nothing(gguf_path, oracle):
    """temperature 1e-310 made NaN probabilities, and the step's error handler failed every request
    in the step. It is a (numerically safe) greedy draw now, and the others never notice."""
    llm = LLM(gguf_path, n_ctx=CTX)
    app = create_app(llm, max_batch=4)
    app.state.scheduler.engine = _Slow(llm.engine, 0.01)  # the four overlap
    prompts = ["The quick", "def fib", "Unicode ☃"]
    expected = [oracle.generate(p, max_tokens=16, temperature=0) for p in prompts]
    texts = {}
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        def client(i):
            texts[i] = stream_text(http, {"prompt": prompts[i], "max_tokens": 16, "temperature": 0, **NO_EOS})
        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for temperature in (1e-310, 5e-324):
            tiny = {"prompt": "The quick", "max_tokens": 16, "temperature": temperature, "top_k": 0, **NO_EOS}
            assert stream_text(http, tiny) == expected[0]
        for t in threads:
            t.join(30)
        assert [texts.get(i) for i in range(3)] == expected
        assert wait_idle(url)["slots_busy"] == 0


def test_requests_that_fail_fail_alone(oracle, scheduler_of):
    """A request that breaks while being admitted, sampled or reported fails by itself, with an
    opaque 500 (the details go to the log); the others carry on and the slots come back."""
    scheduler, engine = scheduler_of(max_batch=4, max_queue=4)
    good = [job(oracle, p, max_tokens=6) for p in ("The quick", "def fib")]
    refused, refused_sink = job(oracle, "hello", stop=[""])  # TextStream refuses it at admission
    nan, nan_sink = job(oracle, "Unicode ☃")
    nan.params = SamplingParams(temperature=1.0, top_k=0, top_p=1, min_p=0, seed=1)
    engine.nan_for = lambda sequence: nan.slot is not None and sequence is scheduler.slots[nan.slot]
    broken, broken_sink = job(oracle, "The lazy dog")

    def broken_on_event(event):  # the client's end breaks on the first text it gets
        broken_sink(event)
        if not event.last:
            raise RuntimeError("the sink broke")
    broken.on_event = broken_on_event
    scheduler.submit([refused, nan, broken] + [j for j, _ in good])
    for (j, sink), prompt in zip(good, ("The quick", "def fib")):
        assert sink.done.wait(10), "a good request was lost"
        assert sink.text == oracle.generate(prompt, max_tokens=6, temperature=0)
    for sink in (refused_sink, nan_sink, broken_sink):
        assert sink.done.wait(10)
        error = sink.events[-1].error
        assert error.status == 500 and error.message.startswith("internal error")
        assert "NaN" not in error.message and "broke" not in error.message and "stop" not in error.message
    assert scheduler.state() == {"slots_total": 4, "slots_busy": 0, "queue": 0, "running": 0}
    assert scheduler.metrics.requests["error"] == 3 and scheduler.metrics.requests["completed"] == 2


class _Fatal(BaseException):
    """What no handler catches: the engine thread dies of it."""


def test_a_dead_engine_is_reported_and_nothing_hangs(gguf_path):
    llm = LLM(gguf_path, n_ctx=CTX)
    app = create_app(llm, max_batch=1, max_queue=2)
    scheduler = app.state.scheduler
    scheduler.engine = _Slow(llm.engine, 0.02)
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json=LONG) as stream:
            lines = stream.iter_lines()
            next(lines)  # it is generating

            def die():
                raise _Fatal("injected")
            scheduler._expire = die  # the engine loop's next turn dies
            rest = [line for line in lines if line]  # the stream ends, with an error, instead of hanging
        assert any('"error"' in line for line in rest) and rest[-1] == "data: [DONE]"
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        started = time.monotonic()
        error = error_of(http.post("/v1/completions", json={"prompt": "hi"}), 503)
        assert time.monotonic() - started < 2 and "engine" in error["message"]


DYING_SERVER = """
import sys
from tritlm.cli import main
from tritlm.server.scheduler import Scheduler

expire = Scheduler._expire
class Fatal(BaseException):
    pass
def dying(self):  # a request for 77 tokens kills the engine thread
    if any(job.max_tokens == 77 for job in self.waiting):
        raise Fatal("injected")
    expire(self)
Scheduler._expire = dying
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_stops_the_server_whatever_became_of_the_engine(gguf_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", DYING_SERVER, "serve", "-m", str(gguf_path), "-c", str(CTX),
                               "--port", str(port)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        response = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 77}, timeout=5)
        assert response.status_code == 503  # the request that met the fault fails; nothing hangs
        assert httpx.get(url + "/health", timeout=5).status_code == 503
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises it once it has shut down
        assert "injected" in server.stderr.read()  # the traceback is in the log
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.fixture
def counted(gguf_path):
    """An LLM whose tokenizing and chat rendering take 1 s each (a long text's), counted."""
    llm = LLM(gguf_path, n_ctx=CTX)
    calls = []
    tokenize, chat_prompt = llm.tokenize, llm.chat_prompt

    def slow(real):
        def call(*args, **kw):
            calls.append(real.__name__)
            time.sleep(1.0)
            return real(*args, **kw)
        return call
    llm.tokenize, llm.chat_prompt = slow(tokenize), slow(chat_prompt)
    return llm, calls


def test_tokenizing_does_not_stall_the_server(counted):
    """Endpoints tokenized inside the event loop: a long text stalled every other client (even
    /health) for as long as it took."""
    llm, calls = counted
    with serving(create_app(llm, max_batch=2)) as url:
        reply = {}
        thread = threading.Thread(target=lambda: reply.update(r=httpx.post(
            url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=30)))
        thread.start()
        while not calls:
            time.sleep(0.005)
        worst = 0.0
        while thread.is_alive():
            started = time.monotonic()
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.02)
        assert reply["r"].status_code == 200 and calls == ["chat_prompt", "tokenize"]
        assert worst < 0.5, f"/health took {worst:.2f} s while a prompt was tokenized"


def test_counts_and_lengths_are_checked_before_tokenizing(counted):
    llm, calls = counted
    with serving(create_app(llm, max_batch=2, max_queue=2, max_body_bytes=1 << 20)) as url:
        post = lambda path, body: httpx.post(url + path, json=body, timeout=30)  # noqa: E731
        cases = [("/v1/embeddings", {"input": ["hi"] * 2049}, "input", None),
                 ("/v1/completions", {"prompt": ["hi"] * 5}, "prompt", None),  # 5 sequences: 2 slots + 2 queued
                 ("/v1/completions", {"prompt": ["hi"] * 2, "n": 3}, "n", None),
                 ("/v1/completions", {"prompt": "hi " * 100_000}, "prompt", "context_length_exceeded"),
                 ("/v1/embeddings", {"input": ["hi", "hi " * 100_000]}, "input", "context_length_exceeded"),
                 ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 100_000}]},
                  "messages", "context_length_exceeded")]
        for path, body, param, code in cases:
            error = error_of(post(path, body), 400)
            assert (error["param"], error["code"]) == (param, code), (path, error)
        assert calls == []  # refused untokenized


def test_the_body_size_is_limited(gguf_path):
    llm = LLM(gguf_path, n_ctx=CTX)
    with serving(create_app(llm, max_body_bytes=2000)) as url:
        small = {"prompt": "hi", "max_tokens": 2, "user": "x" * 1500}
        assert httpx.post(url + "/v1/completions", json=small).status_code == 200
        big = small | {"user": "x" * 2500}
        error = error_of(httpx.post(url + "/v1/completions", json=big), 413)  # by its Content-Length
        assert error["code"] == "request_too_large" and "2000" in error["message"]

        def chunks():  # no Content-Length: counted as it comes
            body = json.dumps(big).encode()
            for i in range(0, len(body), 500):
                yield body[i : i + 500]
        assert error_of(httpx.post(url + "/v1/completions", content=chunks(),
                                   headers={"content-type": "application/json"}), 413)
        assert httpx.post(url + "/v1/completions", json=small).status_code == 200


def test_bodies_costly_to_parse_are_refused_cheaply(base_url):
    """Parsing and validating run on the event loop: a body of countless tiny arrays or objects, or
    a list of countless items, is refused before (or without) its items being built and checked."""
    post = lambda path, content: httpx.post(base_url + path, content=content,  # noqa: E731
                                            headers={"content-type": "application/json"})
    tiny_arrays = b'{"prompt": [' + b"[]," * 40000 + b"[]]}"
    assert error_of(post("/v1/completions", tiny_arrays), 400)["code"] == "body_too_complex"
    messages = json.dumps({"messages": [{"role": "user", "content": "a"}] * 2049}).encode()
    assert error_of(post("/v1/chat/completions", messages), 400)["param"] == "messages"
    parts = json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 2049}]}).encode()
    assert error_of(post("/v1/chat/completions", parts), 400)["param"] == "messages.0.content"
    prompts = json.dumps({"prompt": [[1]] * 2049}).encode()
    assert error_of(post("/v1/completions", prompts), 400)["param"] == "prompt"
    for body in (b"null", b"[1]", b'"text"'):
        assert error_of(post("/v1/completions", body), 400)["code"] == "invalid_json"


def exchange(url, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the server and read until it closes the connection (or `timeout`)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        return received


def test_key_and_size_are_checked_before_the_body_is_read(gguf_path):
    """A 40 MB body without a key was read and parsed before the 401; now nothing of it is read."""
    llm = LLM(gguf_path, n_ctx=CTX)
    with serving(create_app(llm, api_key="s3cret")) as url:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        answer = exchange(url, head + b"Content-Length: 40000000\r\n\r\n{", timeout=3)
        assert answer.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in answer
        keyed = head + b"Authorization: Bearer s3cret\r\n"
        answer = exchange(url, keyed + b"Content-Length: 40000000\r\n\r\n{", timeout=3)
        assert answer.startswith(b"HTTP/1.1 413")


def test_slow_and_half_open_clients_are_cut_off(gguf_path):
    """A request (head and body) must arrive within the read timeout; uvicorn alone waited for ever."""
    llm = LLM(gguf_path, n_ctx=CTX)
    with serving(create_app(llm), read_timeout=0.5) as url:
        for data in (b"", b"GET /health HTTP/1.1\r\nHo",
                     b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro"):
            started = time.monotonic()
            assert exchange(url, data, timeout=5) == b""  # closed, unanswered
            assert time.monotonic() - started < 3
        assert httpx.get(url + "/health").status_code == 200


def test_a_long_stop_string_is_one_stop_string(client):
    """The 16-item limit on `stop` was applied to a string's length too."""
    reply = client.completions.create(model="tiny.gguf", prompt="The quick", stop="a stop string of 33 characters..",
                                      max_tokens=3, extra_body=NO_EOS)
    assert reply.choices[0].finish_reason == "length"


SURROGATE = "bad \ud800 text"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": SURROGATE}]}, "messages.0.name"),
    ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", SURROGATE]}, "prompt"),  # the message says: item 1
    ("/v1/completions", {"prompt": "hi", "stop": [SURROGATE]}, "stop.0"),
    ("/v1/completions", {"prompt": "hi", "model": SURROGATE}, "model"),
    ("/v1/embeddings", {"input": SURROGATE}, "input"),
])
def test_lone_surrogates_are_refused_by_name(base_url, path, body, param):
    """A lone surrogate (valid JSON, not valid Unicode text) reached the tokenizer: a 500."""
    error = error_of(httpx.post(base_url + path, **raw(body)), 400)
    assert error["param"] == param and "surrogate" in error["message"]


def test_internal_errors_say_nothing_but_go_to_the_log(gguf_path, caplog):
    llm = LLM(gguf_path, n_ctx=CTX)

    def broken(messages):
        raise RuntimeError("secret internal detail")
    llm.chat_prompt = broken
    with serving(create_app(llm)) as url, caplog.at_level(logging.ERROR):
        error = error_of(httpx.post(url + "/v1/chat/completions",
                                    json={"messages": [{"role": "user", "content": "hi"}]}), 500)
        assert error["type"] == "server_error" and error["message"].startswith("internal error")
        assert "secret" not in error["message"] and "RuntimeError" not in error["message"]
        request_id = error["message"].split()[-1].strip("()")
        assert any("secret internal detail" in r.getMessage() + str(r.exc_info) and request_id in r.getMessage()
                   for r in caplog.records)


def test_foreign_host_names_are_refused(gguf_path):
    """DNS rebinding: a web page's script reaching a key-less server on 127.0.0.1 sends its own
    host name in Host."""
    llm = LLM(gguf_path, n_ctx=CTX)
    with serving(create_app(llm, allowed_hosts=["localhost", "127.0.0.1", "[::1]"])) as url:
        port = url.rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
            error = error_of(httpx.get(url + "/v1/models", headers={"host": host}), 400)
            assert error["code"] == "invalid_host"
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert httpx.get(url + "/v1/models", headers={"host": host}).status_code == 200, host


# ------------------------------------------------------------------ queue and slots

LONG = {"prompt": "The quick", "max_tokens": CTX - 10, "ignore_eos": True, "stream": True}


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(gguf_path):
    llm = LLM(gguf_path, n_ctx=CTX)
    app = create_app(llm, max_batch=1, max_queue=0)
    app.state.scheduler.engine = _Slow(llm.engine, 0.02)  # long enough to overlap the requests
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=LONG) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)  # it is generating: the only slot is taken
            error = error_of(http.post("/v1/completions", json={"prompt": "hi"}), 429)
            assert error["type"] == "rate_limit_error"
            assert http.get("/health").json()["slots_busy"] == 1
        # the client left mid-stream: the slot is free within a step or two
        assert wait_idle(url, timeout=2)["slots_busy"] == 0
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


# ------------------------------------------------------------------ the scheduler


class _Slow:
    """The engine, with a pause in every forward and a log of what each one advanced; the logits
    of the sequences `nan_for` picks are NaN."""

    def __init__(self, engine, pause: float):
        self.engine, self.pause, self.log = engine, pause, []
        self.nan_for = lambda sequence: False

    def forward(self, batch, all_logits=False):
        self.log.append([len(tokens) for _, tokens in batch])
        time.sleep(self.pause)
        rows = self.engine.forward(batch, all_logits=all_logits)
        return [np.full_like(row, np.nan) if self.nan_for(seq) else row for (seq, _), row in zip(batch, rows)]

    def __getattr__(self, name):
        return getattr(self.engine, name)


class _Collect:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.last:
            self.done.set()

    @property
    def text(self):
        return "".join(e.text for e in self.events)


def job(llm, prompt, max_tokens=8, **kw):
    sink = _Collect()
    return Job(prompt=llm.tokenize(prompt), on_event=sink, params=SamplingParams(temperature=0),
               max_tokens=max_tokens, ignore_eos=True, **kw), sink


@pytest.fixture
def scheduler_of(oracle):
    made = []

    def make(pause=0.0, **kw):
        engine = _Slow(oracle.engine, pause)
        made.append(Scheduler(engine, oracle.tokenizer, ctx_per_slot=CTX, **kw).start())
        return made[-1], engine

    yield make
    for s in made:
        s.stop()


def test_one_forward_advances_every_request(oracle, scheduler_of):
    scheduler, engine = scheduler_of(max_batch=4, prefill_chunk=64)
    jobs = [job(oracle, p, max_tokens=6) for p in ("The quick", "def fib", "Unicode ☃")]
    scheduler.submit([j for j, _ in jobs])
    for (j, sink), prompt in zip(jobs, ("The quick", "def fib", "Unicode ☃")):
        assert sink.done.wait(30)
        assert sink.text == oracle.generate(prompt, max_tokens=6, temperature=0)  # batching changes nothing
        assert sink.events[-1].finish_reason == "length"
    assert [3, 3, 3] not in engine.log and [1, 1, 1] in engine.log  # decode steps batch all three
    assert scheduler.state() == {"slots_total": 4, "slots_busy": 0, "queue": 0, "running": 0}


def test_newcomer_prefill_is_chunked_between_decode_steps(oracle, scheduler_of):
    scheduler, engine = scheduler_of(pause=0.01, max_batch=2, prefill_chunk=4)
    first, first_sink = job(oracle, "The quick", max_tokens=40)
    scheduler.submit([first])
    while len(engine.log) < 3:
        time.sleep(0.005)
    second, second_sink = job(oracle, "def fibonacci(n): return fibonacci", max_tokens=4)
    scheduler.submit([second])
    assert second_sink.done.wait(30) and first_sink.done.wait(30)
    n = len(second.prompt)
    joint = [step for step in engine.log if len(step) == 2]
    # the newcomer's prompt went in chunks of 4 while the first request kept decoding
    assert [s[1] for s in joint[: -(-n // 4)]] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    assert all(s[0] == 1 for s in joint)
    assert second_sink.text == oracle.generate(second.prompt, max_tokens=4, temperature=0)


def test_fifo_order_and_slot_reuse(oracle, scheduler_of):
    scheduler, _ = scheduler_of(pause=0.002, max_batch=1, max_queue=4)
    jobs = [job(oracle, f"{i} The quick", max_tokens=3) for i in range(4)]
    order = []
    for j, sink in jobs:
        j.on_event = lambda e, sink=sink, i=len(order): (sink(e), e.last and order.append(sink))
    scheduler.submit([j for j, _ in jobs])
    assert all(sink.done.wait(30) for _, sink in jobs)
    assert order == [sink for _, sink in jobs]
    assert len(scheduler.slots) == 1 and scheduler.state()["slots_busy"] == 0


def test_timeouts_and_cancel(oracle, scheduler_of):
    scheduler, _ = scheduler_of(pause=0.02, max_batch=1, max_queue=2)
    slow, slow_sink = job(oracle, "The quick", max_tokens=100, timeout=0.5)
    queued, queued_sink = job(oracle, "The quick", max_tokens=2, timeout=0.1)
    scheduler.submit([slow, queued])
    assert queued_sink.done.wait(5) and queued_sink.events[-1].error.status == 503  # never got the slot
    assert slow_sink.done.wait(5) and slow_sink.events[-1].error.status == 504
    assert slow_sink.text  # it was generating when it ran out of time
    held, held_sink = job(oracle, "The quick", max_tokens=100)
    scheduler.submit([held])
    while not held_sink.events:
        time.sleep(0.005)
    scheduler.cancel([held])
    deadline = time.monotonic() + 1
    while scheduler.state()["slots_busy"] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert scheduler.state()["slots_busy"] == 0 and not held_sink.done.is_set()
    assert scheduler.metrics.requests["cancelled"] == 1 and scheduler.metrics.requests["timeout"] == 2


# --------------------------------------------------------------- speculative decoding

REPEATING = "The quick brown fox. The quick brown fox. The quick brown fox. The quick"


@pytest.mark.parametrize("draft", ["itself", "another model"])
def test_speculative_and_ordinary_sequences_share_a_step(oracle, scheduler_of, draft_path, draft):
    """Jobs verifying guesses (prompt lookup, a draft model) beside jobs decoding plainly, in the
    same forward passes: every text is plain greedy decoding's, and the guesses rejected leave no
    trace in the slots' caches (the texts go on right after them)."""
    draft_engine = oracle.engine if draft == "itself" else LLM(draft_path, n_ctx=CTX).engine
    scheduler, engine = scheduler_of(max_batch=4, prefill_chunk=64, draft_engine=draft_engine)
    prompts = [REPEATING, "def fibonacci(n): return fibonacci", REPEATING, "The lazy dog"]
    modes = ["lookup", None, "draft", None]
    jobs = [job(oracle, p, max_tokens=40, speculative=m) for p, m in zip(prompts, modes)]
    jobs[2][0].logprobs = 2
    scheduler.submit([j for j, _ in jobs])
    for (j, sink), prompt in zip(jobs, prompts):
        assert sink.done.wait(60)
        assert sink.text == oracle.generate(prompt, max_tokens=40, temperature=0)
        assert sink.events[-1].completion_tokens == 40
    assert sum(len(e.logprobs) for e in jobs[2][1].events) == 40
    m = scheduler.metrics
    assert 0 < m.accepted_tokens <= m.proposed_tokens and m.completion_tokens == 160
    # steps where a job fed guesses (more than one token) while another decoded one token
    assert any(max(step) > 1 and 1 in step for step in engine.log if len(step) == 4)


def test_draft_steps_are_shared_by_the_requests(oracle, scheduler_of, draft_path):
    """Three requests with the same draft model: each draft step is one forward pass for all of
    them (the draft's weights read once), and every text is still plain greedy decoding's."""
    draft = _Slow(LLM(draft_path, n_ctx=CTX).engine, 0.0)
    scheduler, _ = scheduler_of(max_batch=3, prefill_chunk=64, draft_engine=draft)
    prompts = [REPEATING, "def fibonacci(n): return fibonacci", "The lazy dog"]
    jobs = [job(oracle, p, max_tokens=30, speculative="draft", max_guesses=4) for p in prompts]
    scheduler.submit([j for j, _ in jobs])
    for (j, sink), prompt in zip(jobs, prompts):
        assert sink.done.wait(60)
        assert sink.text == oracle.generate(prompt, max_tokens=30, temperature=0)
    assert [1, 1, 1] in draft.log  # a draft step guessing for all three
    assert len(draft.log) < scheduler.metrics.proposed_tokens  # fewer passes than guesses


def test_speculative_sampling_is_reproducible(oracle, scheduler_of):
    scheduler, _ = scheduler_of(max_batch=2)
    texts = []
    for _ in range(2):
        j, sink = job(oracle, REPEATING, max_tokens=30, speculative="lookup", max_guesses=4)
        j.params = SamplingParams(temperature=0.7, seed=4)
        scheduler.submit([j])
        assert sink.done.wait(60)
        texts.append(sink.text)
    assert texts[0] == texts[1] and scheduler.metrics.proposed_tokens > 0


def speculative_counters(http) -> list[float]:
    """The server's guesses proposed and accepted, from /metrics."""
    return [float(line.split()[1]) for line in http.get("/metrics").text.splitlines()
            if line.startswith(("tritlm_speculative_proposed_tokens_total ",
                                "tritlm_speculative_accepted_tokens_total "))]


def test_serve_lookup_and_the_per_request_opt_out(gguf_path, oracle):
    llm = LLM(gguf_path, n_ctx=CTX)
    with serving(create_app(llm, max_batch=2, speculative="lookup", max_guesses=4)) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        assert speculative_counters(http) == [0, 0]
        body = {"prompt": REPEATING, "max_tokens": 30, "temperature": 0, **NO_EOS}
        expected = oracle.generate(REPEATING, max_tokens=30, temperature=0)
        assert http.post("/v1/completions", json=body | {"speculative": False}).json()["choices"][0]["text"] == expected
        assert speculative_counters(http) == [0, 0]  # opted out
        assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected
        proposed, accepted = speculative_counters(http)
        assert 0 < accepted <= proposed
        assert stream_text(http, body) == expected
        assert error_of(http.post("/v1/completions", json=body | {"speculative": "yes"}), 400)["param"] == "speculative"
    with pytest.raises(ValueError, match="max_guesses"):
        create_app(llm, speculative="lookup", max_guesses=0)
    with pytest.raises(ValueError, match="speculative"):
        create_app(llm, speculative="ngram")
    with pytest.raises(ValueError, match="needs a draft model"):
        create_app(llm, speculative="draft")


def test_serve_a_draft_model(gguf_path, oracle):
    """`tritlm serve --draft`: the model as its own draft, so every guess must be accepted, and
    the text is plain greedy decoding's, streamed or not, while a request may opt out."""
    llm = LLM(gguf_path, n_ctx=CTX, draft_model=gguf_path)
    with serving(create_app(llm, max_batch=2, speculative="draft", max_guesses=4)) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        body = {"prompt": "The lazy dog", "max_tokens": 30, "temperature": 0, **NO_EOS}
        expected = oracle.generate("The lazy dog", max_tokens=30, temperature=0)
        assert http.post("/v1/completions", json=body | {"speculative": False}).json()["choices"][0]["text"] == expected
        assert speculative_counters(http) == [0, 0]
        assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected
        assert stream_text(http, body) == expected
        proposed, accepted = speculative_counters(http)
        assert proposed >= 20 and accepted == proposed


# ------------------------------------------------------------------------- the CLI


def test_serve_flags():
    args = build_parser().parse_args(["serve", "-m", "x.gguf", "-p", "Be brief.", "-n", "64", "-t", "2",
                                      "-c", "1024", "--temperature", "0.5", "--host", "0.0.0.0", "--port", "9000",
                                      "--api-key", "k", "--max-batch", "4", "--max-queue", "9",
                                      "--ctx-per-slot", "512", "--max-body-bytes", "1000", "--read-timeout", "5",
                                      "--allowed-hosts", "a.example,b.example", "--lookup", "5"])
    assert (args.model, args.prompt, args.n_predict, args.threads, args.ctx_size, args.temperature) == \
        ("x.gguf", "Be brief.", 64, 2, 1024, 0.5)
    assert (args.host, args.port, args.api_key, args.max_batch, args.max_queue, args.ctx_per_slot) == \
        ("0.0.0.0", 9000, "k", 4, 9, 512)
    assert (args.max_body_bytes, args.read_timeout, args.allowed_hosts) == (1000, 5.0, "a.example,b.example")
    assert args.lookup == 5 and build_parser().parse_args(["serve", "--lookup"]).lookup == 8
    defaults = build_parser().parse_args(["serve"])
    assert defaults.host == "127.0.0.1" and defaults.model is None
    assert (defaults.max_body_bytes, defaults.read_timeout, defaults.allowed_hosts) == (256 * 1024, 60.0, None)
    assert defaults.lookup == 0 and defaults.draft is None
    assert build_parser().parse_args(["serve", "--draft", "d.gguf"]).draft == "d.gguf"
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(["serve", "--draft", "d.gguf", "--lookup"])


def test_serve_ray_flags(capsys, monkeypatch):
    args = build_parser().parse_args(["serve", "--ray", "--address", "auto", "--min-replicas", "1",
                                      "--max-replicas", "4", "--target-ongoing-requests", "6"])
    assert (args.ray, args.address, args.replicas, args.min_replicas, args.max_replicas,
            args.target_ongoing_requests) == (True, "auto", None, 1, 4, 6.0)
    assert main(["serve", "--replicas", "2"]) == 2  # before any model is loaded
    assert "--replicas: only with --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [cluster] extra were not installed
    assert main(["serve", "--ray"]) == 2
    assert "pip install 'tritlm[cluster]'" in capsys.readouterr().err


@pytest.mark.parametrize("host, key, given, expected", [
    ("127.0.0.1", None, None, ["localhost", "127.0.0.1", "[::1]"]),  # key-less on loopback: checked
    ("localhost", None, None, ["localhost", "127.0.0.1", "[::1]"]),
    ("::1", None, None, ["localhost", "127.0.0.1", "[::1]"]),
    ("127.0.0.2", None, None, ["localhost", "127.0.0.1", "[::1]"]),
    ("127.0.0.1", "k", None, None),  # a key guards it
    ("0.0.0.0", None, None, None),  # meant to be reached by any name
    ("127.0.0.1", None, "proxy.example, localhost", ["proxy.example", "localhost"]),
    ("0.0.0.0", "k", "*", ["*"]),
])
def test_default_allowed_hosts(host, key, given, expected):
    from tritlm.cli.serve import allowed_hosts
    assert allowed_hosts(host, key, given) == expected


def test_serve_command(gguf_path, oracle, monkeypatch):
    seen = {}

    def run(app, host, port, **kw):  # instead of uvicorn.run: serve the app here, try it, stop
        seen.update(host=host, port=port, options=kw, frozen=gc.get_freeze_count())
        with serving(app) as url:
            seen["models"] = httpx.get(url + "/v1/models").status_code
            seen["too_large"] = httpx.post(url + "/v1/completions", content=b"x" * 2000,
                                           headers={"Authorization": "Bearer k"}).status_code
            seen["reply"] = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k"},
                                       json={"messages": [{"role": "user", "content": "hi"}], **NO_EOS}).json()
            seen["health"] = httpx.get(url + "/health").json()
            seen["foreign_host"] = httpx.get(url + "/health", headers={"host": "evil.example"}).status_code

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(["serve", "-m", str(gguf_path), "-c", "64", "-n", "3", "-p", "Be brief.", "--max-batch", "2",
                 "--api-key", "k", "--port", "9999", "--max-body-bytes", "1000", "--read-timeout", "7"]) == 0
    assert (seen["host"], seen["port"], seen["models"], seen["too_large"]) == ("127.0.0.1", 9999, 401, 413)
    assert seen["options"]["http"].keywords == {"read_timeout": 7.0}
    assert seen["options"]["timeout_graceful_shutdown"] and seen["options"]["timeout_keep_alive"]
    assert seen["frozen"] > 0 and gc.get_freeze_count() == 0  # the model etc. frozen while serving
    assert seen["health"]["slots_total"] == 2
    usage = seen["reply"]["usage"]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert usage["completion_tokens"] == 3  # -n: the default max_tokens
    assert usage["prompt_tokens"] == oracle.create_chat_completion(system, max_tokens=1)["usage"]["prompt_tokens"]
    assert seen["foreign_host"] == 200  # a key guards it: any host name
    assert main(["serve", "-m", str(gguf_path), "-c", "64"]) == 0  # key-less, on loopback: host names checked
    assert seen["foreign_host"] == 400
    assert main(["serve", "-m", str(gguf_path), "-c", "64", "--ctx-per-slot", "65"]) == 2  # a clear error


# ------------------------------------------------------------------ the chat page

CHROMIUM = "/usr/bin/chromium"
REQUIRE_BROWSER = os.environ.get("TRITLM_REQUIRE_BROWSER") == "1"  # CI: a missing browser fails


def test_chat_page_in_headless_chromium(gguf_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not shutil.which(CHROMIUM):
        if REQUIRE_BROWSER:
            pytest.fail(f"the browser test needs Playwright's Python package and {CHROMIUM}")
        pytest.skip(f"needs Playwright's Python package and {CHROMIUM}")
    llm = LLM(gguf_path, n_ctx=CTX)
    app = create_app(llm, max_tokens=24, temperature=0)
    app.state.scheduler.engine = _Slow(llm.engine, 0.02)  # tokens come apart, as from a real model
    with serving(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        page = browser.new_page()
        outside = []  # the page must need nothing but this server
        page.on("request", lambda r: r.url.startswith(url) or r.url.startswith("data:") or outside.append(r.url))
        bodies = []
        page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and bodies.append(r.post_data_json))
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny.gguf'")
        page.click("#settings summary")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "24")
        # count the reply's updates: streamed text arrives in several pieces
        page.evaluate("""window.updates = 0; new MutationObserver(() => window.updates++)
            .observe(document.getElementById('messages'), {subtree: true, childList: true})""")
        for i, text in enumerate(("def fibonacci", "The quick")):
            page.fill("#input", text)
            page.press("#input", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {i + 1}"
                                   " && document.body.dataset.state === 'idle'", timeout=30000)
        assert page.evaluate("window.updates") > 6  # 2 bubbles per turn, then the pieces
        replies = page.locator(".msg.assistant").all_text_contents()
        users = page.locator(".msg.user").all_text_contents()
        assert users == ["def fibonacci", "The quick"] and len(replies) == 2 and all(replies)
        assert not page.locator(".msg.error").count()
        # the second request carried the whole conversation, and the replies are the model's
        first = [{"role": "user", "content": "def fibonacci"}]
        assert bodies[1]["messages"] == first + [{"role": "assistant", "content": replies[0]},
                                                  {"role": "user", "content": "The quick"}]
        assert bodies[0]["stream"] is True and bodies[0]["truncate"] == "oldest"
        expected = llm.create_chat_completion(first, max_tokens=24, temperature=0)
        assert replies[0] == expected["choices"][0]["message"]["content"]
        assert bodies[0]["temperature"] == 0 and bodies[0]["max_tokens"] == 24
        page.reload()  # the conversation survives a reload
        page.wait_for_function("document.querySelectorAll('.msg').length === 4")
        page.click("#new")
        assert page.locator(".msg").count() == 0
        browser.close()
        assert not outside, f"the page fetched {outside}"


def test_a_chat_too_long_loses_its_oldest_turns_when_asked(base_url, oracle):
    """truncate: "oldest" (what the chat page sends): the conversation keeps its newest turns that
    fit with room for the reply, says how many messages went, and answers as the model does to
    what is left; without it, a conversation too long is a 400."""
    turns = [{"role": role, "content": f"message number {i} " * 3}
             for i in range(12) for role in ("user", "assistant")][:-1]
    body = {"messages": turns, **GREEDY, **NO_EOS}
    assert error_of(httpx.post(base_url + "/v1/chat/completions", json=body), 400)["code"] == "context_length_exceeded"
    reply = httpx.post(base_url + "/v1/chat/completions", json=body | {"truncate": "oldest"}).json()
    kept, dropped = oracle.fit_chat(turns, GREEDY["max_tokens"])
    assert reply["dropped_messages"] == dropped > 0
    expected = oracle.create_chat_completion(kept, **GREEDY)["choices"][0]["message"]["content"]
    assert reply["choices"][0]["message"]["content"] == expected
    stream = httpx.post(base_url + "/v1/chat/completions", json=body | {"truncate": "oldest", "stream": True}).text
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert all(c["dropped_messages"] == dropped for c in chunks)
    last_alone = {"messages": [{"role": "user", "content": "word " * 400}], "truncate": "oldest"}
    assert error_of(httpx.post(base_url + "/v1/chat/completions", json=last_alone), 400)["code"] == "context_length_exceeded"
