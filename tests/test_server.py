"""The OpenAI-compatible server, driven by the official `openai` client over loopback, on a tiny
model built here; the scheduler on its own; the web chat page in headless Chromium."""

import os
import shutil
import socket
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
from tritlm.server import Job, Scheduler, create_app  # noqa: E402

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
def oracle(gguf_path):
    """A separate LLM: what the server must reproduce."""
    return LLM(gguf_path, n_ctx=CTX)


@contextmanager
def serving(app):
    """Run the app with uvicorn on a free loopback port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
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
    assert error_of(post("/v1/embeddings", json={"input": "hi", "dimensions": 7}), 400)["param"] == "dimensions"
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
    """The engine, with a pause in every forward and a log of what each one advanced."""

    def __init__(self, engine, pause: float):
        self.engine, self.pause, self.log = engine, pause, []

    def forward(self, batch):
        self.log.append([len(tokens) for _, tokens in batch])
        time.sleep(self.pause)
        return self.engine.forward(batch)

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


# ------------------------------------------------------------------------- the CLI


def test_serve_flags():
    args = build_parser().parse_args(["serve", "-m", "x.gguf", "-p", "Be brief.", "-n", "64", "-t", "2",
                                      "-c", "1024", "--temperature", "0.5", "--host", "0.0.0.0", "--port", "9000",
                                      "--api-key", "k", "--max-batch", "4", "--max-queue", "9",
                                      "--ctx-per-slot", "512"])
    assert (args.model, args.prompt, args.n_predict, args.threads, args.ctx_size, args.temperature) == \
        ("x.gguf", "Be brief.", 64, 2, 1024, 0.5)
    assert (args.host, args.port, args.api_key, args.max_batch, args.max_queue, args.ctx_per_slot) == \
        ("0.0.0.0", 9000, "k", 4, 9, 512)
    defaults = build_parser().parse_args(["serve"])
    assert defaults.host == "127.0.0.1" and defaults.model is None


def test_serve_command(gguf_path, oracle, monkeypatch):
    seen = {}

    def run(app, host, port, **kw):  # instead of uvicorn.run: serve the app here, try it, stop
        seen.update(host=host, port=port)
        with serving(app) as url:
            seen["models"] = httpx.get(url + "/v1/models").status_code
            seen["reply"] = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k"},
                                       json={"messages": [{"role": "user", "content": "hi"}], **NO_EOS}).json()
            seen["health"] = httpx.get(url + "/health").json()

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(["serve", "-m", str(gguf_path), "-c", "64", "-n", "3", "-p", "Be brief.", "--max-batch", "2",
                 "--api-key", "k", "--port", "9999"]) == 0
    assert (seen["host"], seen["port"], seen["models"]) == ("127.0.0.1", 9999, 401)
    assert seen["health"]["slots_total"] == 2
    usage = seen["reply"]["usage"]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert usage["completion_tokens"] == 3  # -n: the default max_tokens
    assert usage["prompt_tokens"] == oracle.create_chat_completion(system, max_tokens=1)["usage"]["prompt_tokens"]
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
        assert bodies[0]["stream"] is True
        expected = llm.create_chat_completion(first, max_tokens=24, temperature=0)
        assert replies[0] == expected["choices"][0]["message"]["content"]
        assert bodies[0]["temperature"] == 0 and bodies[0]["max_tokens"] == 24
        page.reload()  # the conversation survives a reload
        page.wait_for_function("document.querySelectorAll('.msg').length === 4")
        page.click("#new")
        assert page.locator(".msg").count() == 0
        browser.close()
        assert not outside, f"the page fetched {outside}"
