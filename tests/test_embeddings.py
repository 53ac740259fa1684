"""Embeddings: `LLM.embed` / `create_embedding`, the server's /v1/embeddings and `tritlm embed`,
on a tiny model built here, against oracles computed apart from `tritlm.embeddings`: the engine's
hidden states fed one token at a time, pooled and normalised in NumPy here, and the NumPy
reference forward's."""

import base64
import dataclasses
import io
import threading

import numpy as np
import pytest
from tiny_models import write_bitnet, write_tokenizer

from tritlm import LLM
from tritlm.cli import main

CTX = 48  # the context: texts longer than this are truncated (or refused)
CHUNK = 16  # the engine's prefill chunk: longer texts take several steps
TEXTS = ["The quick brown fox", "def fibonacci(n):\n    if n < 2:\n        return n",
         "Ünïcödé ☃ 日本語", "0123456789 " * 4, "x", "The lazy dog. " * 3]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    write_bitnet(directory, "autobitlinear")
    write_tokenizer(directory)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    assert main(["convert", str(directory), "-o", str(path)]) == 0
    return path


def with_pooling(llm: LLM, pooling: str) -> LLM:
    """The model as if its description said `pooling` (the engine shares the config)."""
    llm.config = llm.engine.config = dataclasses.replace(llm.config, pooling=pooling)
    return llm


@pytest.fixture(scope="module", params=["mean", "last"])
def llm(request, gguf_path):
    return with_pooling(LLM(gguf_path, n_ctx=CTX, prefill_chunk=CHUNK), request.param)


def token_by_token(llm: LLM, ids: list[int]) -> np.ndarray:
    """Final hidden states [len(ids), hidden], one token per engine step."""
    sequence = llm.engine.new_sequence(len(ids))
    return np.concatenate([llm.engine.hidden_states(sequence, [t]) for t in ids])


def pooled(hidden: np.ndarray, pooling: str) -> np.ndarray:
    return hidden.astype(np.float64).mean(axis=0) if pooling == "mean" else hidden[-1].astype(np.float64)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def oracle(llm: LLM, text: str, normalize: bool = True, dimensions: int | None = None) -> np.ndarray:
    """The embedding, from the hidden states fed one token at a time, pooled and normalised here."""
    v = pooled(token_by_token(llm, llm.tokenize(text)[:llm.n_ctx]), llm.config.pooling)[:dimensions]
    return unit(v) if normalize else v


# ------------------------------------------------------------------------- LLM.embed


def test_batched_equals_alone_equals_token_by_token(llm):
    together = llm.embed(TEXTS, batch_size=4)  # sorted by length: two batches, rows back in order
    assert together.shape == (len(TEXTS), llm.config.hidden_size) and together.dtype == np.float32
    alone = np.stack([llm.embed(text) for text in TEXTS])
    np.testing.assert_array_equal(together, alone)  # every op treats each token on its own
    np.testing.assert_allclose(together, np.stack([oracle(llm, t) for t in TEXTS]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1, atol=1e-6)
    # the texts differ: a mix-up of rows or of pooling would show
    assert np.abs(together[0] - together[1]).max() > 1e-2


def test_pooling_is_the_models(gguf_path):
    mean = with_pooling(LLM(gguf_path, n_ctx=CTX), "mean").embed(TEXTS[1])
    last = with_pooling(LLM(gguf_path, n_ctx=CTX), "last").embed(TEXTS[1])
    assert np.abs(mean - last).max() > 1e-2


def test_matches_the_numpy_reference(llm, gguf_path):
    """The NumPy reference forward's final hidden states (exact ternary x int8 arithmetic),
    pooled: the same embedding to float rounding (the hidden states agree to ~1e-7)."""
    from tritlm.models import loader, reference

    config, tensors, _ = loader.load(gguf_path)
    for text in TEXTS[:3]:
        hidden = reference.forward(config, tensors, np.array(llm.tokenize(text)), kv_type="f16", hidden=True)
        np.testing.assert_allclose(llm.embed(text), unit(pooled(hidden, llm.config.pooling)), rtol=0, atol=1e-5)


def test_single_text_and_no_texts(llm):
    one = llm.embed(TEXTS[0])
    assert one.shape == (llm.config.hidden_size,)  # sentence-transformers' encode(str): one vector
    np.testing.assert_array_equal(one, llm.embed([TEXTS[0]])[0])
    assert llm.embed([]).shape == (0, llm.config.hidden_size)
    assert llm.embed([], dimensions=8).shape == (0, 8)


def test_normalize_false_and_dimensions(llm):
    raw = llm.embed(TEXTS, normalize=False)
    np.testing.assert_allclose(raw, np.stack([oracle(llm, t, normalize=False) for t in TEXTS]), rtol=1e-6, atol=1e-6)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-2
    cut = llm.embed(TEXTS, dimensions=16)  # Matryoshka: the first 16 values, renormalised
    assert cut.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(cut, unit(raw[:, :16].astype(np.float64)), atol=1e-6)
    np.testing.assert_allclose(cut, np.stack([oracle(llm, t, dimensions=16) for t in TEXTS]), atol=1e-6)
    np.testing.assert_allclose(llm.embed(TEXTS, normalize=False, dimensions=16), raw[:, :16], rtol=0, atol=0)
    np.testing.assert_allclose(llm.embed(TEXTS, dimensions=llm.config.hidden_size), llm.embed(TEXTS), atol=0)
    for bad in (0, -1, llm.config.hidden_size + 1):
        with pytest.raises(ValueError, match="dimensions must be between 1 and"):
            llm.embed(TEXTS[0], dimensions=bad)


def test_too_long_texts_truncate_or_fail(llm):
    long = "The quick brown fox jumps over the lazy dog. " * 10
    ids = llm.tokenize(long)
    assert len(ids) > CTX
    np.testing.assert_allclose(llm.embed(long), unit(pooled(token_by_token(llm, ids[:CTX]), llm.config.pooling)),
                               atol=1e-6)  # its first CTX tokens
    np.testing.assert_array_equal(llm.embed(["hi", long])[1], llm.embed(long))
    with pytest.raises(ValueError, match=rf"texts\[1\] has {len(ids)} tokens; the context holds {CTX}"):
        llm.embed(["hi", long], truncate=False)


@pytest.mark.parametrize("texts, message", [
    (["hi", ""], r"texts\[1\] is empty"),
    (["hi", 3], r"texts\[1\] is not a string"),
])
def test_bad_texts_are_clear_errors(llm, texts, message):
    with pytest.raises(ValueError, match=message):
        llm.embed(texts)


def test_bad_batch_size(llm):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        llm.embed(TEXTS, batch_size=0)


def test_prompt_goes_before_each_text(llm):
    np.testing.assert_array_equal(llm.embed(TEXTS[:2], prompt="query: "),
                                  llm.embed(["query: " + t for t in TEXTS[:2]]))


def test_progress_is_reported_per_batch(llm):
    seen = []
    llm.embed(TEXTS, batch_size=4, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 6), (6, 6)]


def test_create_embedding_is_openai_shaped(llm):
    result = llm.create_embedding(TEXTS[:2])
    assert set(result) == {"object", "data", "model", "usage"} and result["object"] == "list"
    assert result["model"] == "tiny.gguf"
    assert [(d["object"], d["index"]) for d in result["data"]] == [("embedding", 0), ("embedding", 1)]
    np.testing.assert_array_equal(np.array([d["embedding"] for d in result["data"]], np.float32), llm.embed(TEXTS[:2]))
    n = sum(len(llm.tokenize(t)) for t in TEXTS[:2])
    assert result["usage"] == {"prompt_tokens": n, "total_tokens": n}
    packed = llm.create_embedding(TEXTS[0], dimensions=8, encoding_format="base64")
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(vector, llm.embed(TEXTS[0], dimensions=8))
    with pytest.raises(ValueError, match="encoding_format"):
        llm.create_embedding("hi", encoding_format="int8")


def test_an_embedding_model_refuses_to_generate(gguf_path, monkeypatch):
    model = LLM(gguf_path, n_ctx=CTX)
    monkeypatch.setattr(LLM, "can_generate", property(lambda self: False))
    for call in (lambda: model.generate("hi", max_tokens=2), lambda: model.create_chat_completion(
            [{"role": "user", "content": "hi"}], max_tokens=2), lambda: model.logits([1, 2])):
        with pytest.raises(ValueError, match="this model makes embeddings; it cannot generate text"):
            call()
    assert model.embed("hi").shape == (model.config.hidden_size,)


# ------------------------------------------------------------------------- the server

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def served(llm):
    """A client of the app serving `llm`, whose engine steps at most CHUNK tokens at a time, and
    the engine's log."""
    from starlette.testclient import TestClient

    from tritlm.server import create_app

    engine = _Recording(llm.engine)
    app = create_app(llm, max_batch=2, max_queue=4, prefill_chunk=CHUNK)
    app.state.scheduler.engine = engine
    with TestClient(app) as client:
        yield client, engine


class _Recording:
    """The engine, logging how many tokens of each sequence each forward_hidden call ran."""

    def __init__(self, engine):
        self.engine, self.log = engine, []

    def forward_hidden(self, batch, all_rows=True):
        self.log.append([len(tokens) for _, tokens in batch])
        return self.engine.forward_hidden(batch, all_rows)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_server_embeddings_are_the_librarys(llm, served):
    client, engine = served
    engine.log.clear()
    floats = client.post("/v1/embeddings", json={"input": TEXTS}).json()
    assert [d["index"] for d in floats["data"]] == list(range(len(TEXTS)))
    got = np.array([d["embedding"] for d in floats["data"]], np.float32)
    np.testing.assert_allclose(got, llm.embed(TEXTS), rtol=0, atol=1e-6)  # the model's pooling
    assert floats["usage"]["prompt_tokens"] == sum(len(llm.tokenize(t)) for t in TEXTS)
    # several texts share a step, and a text longer than the step's budget runs over several
    assert max(map(len, engine.log)) > 1 and all(sum(step) <= CHUNK for step in engine.log)
    assert sum(map(sum, engine.log)) == floats["usage"]["prompt_tokens"]
    packed = client.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in packed["data"]])
    np.testing.assert_array_equal(decoded, got)


def test_server_dimensions_and_token_input(llm, served):
    client, _ = served
    body = client.post("/v1/embeddings", json={"input": TEXTS[:2], "dimensions": 16}).json()
    got = np.array([d["embedding"] for d in body["data"]], np.float32)
    np.testing.assert_allclose(got, llm.embed(TEXTS[:2], dimensions=16), atol=1e-6)
    ids = llm.tokenize(TEXTS[1])
    body = client.post("/v1/embeddings", json={"input": ids}).json()
    np.testing.assert_allclose(body["data"][0]["embedding"], llm.embed(TEXTS[1]), atol=1e-6)
    for bad in (0, llm.config.hidden_size + 1):
        response = client.post("/v1/embeddings", json={"input": "hi", "dimensions": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "dimensions"


def test_concurrent_embedding_jobs_share_steps(llm):
    """Two embedding jobs at once advance in the same forward_hidden calls."""
    from tritlm.embeddings import finish
    from tritlm.server import Job, Scheduler

    engine = _Recording(llm.engine)
    scheduler = Scheduler(engine, llm.tokenizer, max_batch=2, ctx_per_slot=CTX, prefill_chunk=CHUNK)
    done, results = [threading.Event(), threading.Event()], {}

    def sink(name):
        def on_event(event):
            results[name] = event
            done[name].set()
        return on_event
    inputs = [[llm.tokenize(t) for t in TEXTS[:3]], [llm.tokenize(t) for t in TEXTS[3:]]]
    scheduler.submit([Job(prompt=[], inputs=inputs[0], on_event=sink(0)),
                      Job(prompt=[], inputs=inputs[1], on_event=sink(1))])
    scheduler.start()
    try:
        assert all(d.wait(30) for d in done)
    finally:
        scheduler.stop()
    for name, texts in ((0, TEXTS[:3]), (1, TEXTS[3:])):
        np.testing.assert_allclose(finish(np.stack(results[name].embeddings)), llm.embed(texts), atol=1e-6)
    first_job = sum(map(len, inputs[0]))
    assert sum(engine.log[0]) == CHUNK  # the budget is shared: the first step is full
    assert any(len(step) > 1 for step in engine.log)
    assert sum(map(sum, engine.log)) == first_job + sum(map(len, inputs[1]))


def test_a_server_of_an_embedding_model_refuses_to_generate(gguf_path, monkeypatch):
    from tritlm.server import create_app

    monkeypatch.setattr(LLM, "can_generate", property(lambda self: False))
    model = LLM(gguf_path, n_ctx=CTX)
    app = create_app(model, max_batch=1)
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})):
            response = client.post(path, json=body)
            assert response.status_code == 400
            assert response.json()["error"]["message"] == "this model makes embeddings; it cannot generate text"
        assert client.get("/v1/models").json()["data"][0]["can_generate"] is False
        assert client.post("/v1/embeddings", json={"input": "hi"}).status_code == 200
        assert client.get("/health").json()["slots_busy"] == 0


# ------------------------------------------------------------------------- tritlm embed


def test_cli_writes_the_librarys_vectors(gguf_path, tmp_path, capsys, monkeypatch):
    reference = LLM(gguf_path)  # the command's model: the default context, mean pooling
    texts = [t.replace("\n", " ") for t in TEXTS]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "vectors"  # written as named, no ".npy" added
    assert main(["embed", "-m", str(gguf_path), "-f", str(source), "-o", str(out), "--batch-size", "2"]) == 0
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), reference.config.hidden_size)
    np.testing.assert_array_equal(vectors, reference.embed(texts))
    assert f"wrote {len(texts)} embeddings" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts[:2])))
    assert main(["embed", "-m", str(gguf_path), "-f", "-", "-o", str(out), "--no-normalize",
                 "--dimensions", "8"]) == 0
    np.testing.assert_array_equal(np.load(out), reference.embed(texts[:2], normalize=False, dimensions=8))


@pytest.mark.parametrize("content, args, message", [
    ("a\n\nb\n", [], "line 2 is empty"),
    ("", [], "no lines to embed"),
    ("a\n", ["--dimensions", "0"], "dimensions must be between 1 and"),
    ("a\n", ["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_cli_errors(gguf_path, tmp_path, capsys, content, args, message):
    source = tmp_path / "texts.txt"
    source.write_text(content, encoding="utf-8")
    assert main(["embed", "-m", str(gguf_path), "-f", str(source), "-o", str(tmp_path / "v.npy"), *args]) == 2
    assert message in capsys.readouterr().err


def test_prompts_named_by_the_model(tmp_path):
    """A sentence-transformers model's own prompts (config_sentence_transformers.json): by name,
    and its default one when no prompt is given."""
    import json

    directory = tmp_path / "model"
    directory.mkdir()
    write_bitnet(directory, "autobitlinear")
    write_tokenizer(directory)
    query = "Instruct: given a question, find the passage that answers it\nQuery: "
    config = directory / "config_sentence_transformers.json"
    config.write_text(json.dumps({"prompts": {"query": query, "document": ""}, "default_prompt_name": "query"}))
    llm = LLM(directory, n_ctx=CTX)
    texts = TEXTS[:2]
    with_query = llm.embed(texts, prompt=query)
    np.testing.assert_array_equal(llm.embed(texts, prompt_name="query"), with_query)
    np.testing.assert_array_equal(llm.embed(texts), with_query)  # the default prompt
    np.testing.assert_array_equal(llm.embed(texts, prompt_name="document"), llm.embed(texts, prompt=""))
    assert not np.array_equal(llm.embed(texts, prompt=""), with_query)
    with pytest.raises(ValueError, match="no prompt named 'passage' .it has: query, document"):
        llm.embed(texts, prompt_name="passage")
    with pytest.raises(ValueError, match="not both"):
        llm.embed(texts, prompt="x", prompt_name="query")
    config.write_text(json.dumps({"prompts": {"query": 1}}))
    with pytest.raises(ValueError, match="prompts must map names to strings"):
        LLM(directory)
    config.write_text(json.dumps({"prompts": {"query": query}, "default_prompt_name": "passage"}))
    with pytest.raises(ValueError, match="default_prompt_name .*passage.* is not one of the prompts"):
        LLM(directory)
