"""The OpenAI-compatible HTTP API over a `Scheduler`: request checking, prompts, responses shaped
like OpenAI's (server-sent events when streaming), errors as OpenAI error objects.

Nothing slow runs on the event loop: rendering chat templates and tokenizing go to worker threads,
after the cheap checks (counts, lengths) that can refuse a request without them. The JSON body is
parsed on it (the parser holds the GIL wherever it runs), so its cost is bounded: by the body's
size, and by the number of arrays and objects in it, each of which costs far more than its bytes
(the collector walks them too)."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

import numpy as np

from .. import embeddings
from ..sampling import SamplingParams
from .protocol import ChatRequest, CompletionRequest, EmbeddingRequest
from .scheduler import Job, Scheduler, ServerError, internal_error

log = logging.getLogger("tritlm.server")

# the body is parsed on the event loop: 256 KiB of the costliest JSON (token ids) takes 8-13 ms
# here, a MiB four times that; a request to a server of 2k-4k-token slots is rarely over 50 KB
DEFAULT_MAX_BODY_BYTES = 256 * 1024
# '[' and '{' in a body, strings included: a legitimate request holds at most 2048 messages,
# prompts or inputs (the protocol's caps); 256 KiB of "[]," would be 87000 arrays
MAX_JSON_CONTAINERS = 32768


def create_app(llm, *, api_key: str | None = None, allowed_hosts: list[str] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_batch: int = 8, max_queue: int = 64,
               ctx_per_slot: int | None = None, max_tokens: int = 512, temperature: float = 0.8,
               system_prompt: str | None = None, prefill_chunk: int = 64,
               timeout: float | None = 600.0, model_id: str | None = None, speculative: str | None = None,
               max_guesses: int = 8) -> FastAPI:
    """A FastAPI app serving `llm` (a `tritlm.LLM`). max_tokens and temperature are the defaults
    of requests that give none (max_tokens -1: until the slot's context is full); system_prompt
    starts chats that have no system message. speculative: "lookup" (prompt lookup) or "draft" (the
    llm's draft model, `LLM(draft_model=...)`): speculative decoding of every request that does not
    opt out ("speculative": false), up to max_guesses guesses a step; None: only of requests that opt
    in ("speculative": true), by prompt lookup. allowed_hosts: the host names the Host header may
    carry (None or "*": any); max_body_bytes: the largest request body taken (else 413)."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
    ctx = ctx_per_slot or llm.n_ctx
    if speculative not in (None, "lookup", "draft"):
        raise ValueError(f"speculative must be None, 'lookup' or 'draft', got {speculative!r}")
    if speculative == "draft" and llm.draft is None:
        raise ValueError("speculative='draft' needs a draft model: LLM(..., draft_model=PATH)")
    if isinstance(max_guesses, bool) or not isinstance(max_guesses, int) or max_guesses < 1:
        raise ValueError(f"max_guesses must be a whole number of guesses, at least 1; got {max_guesses!r}")
    scheduler = Scheduler(llm.engine, llm.tokenizer, max_batch=max_batch, max_queue=max_queue,
                          ctx_per_slot=ctx, prefill_chunk=prefill_chunk, timeout=timeout,
                          draft_engine=llm.draft.engine if speculative == "draft" else None)
    api = _API(llm, scheduler, model_id or llm.model_name, ctx, max_tokens, temperature, system_prompt,
               speculative, max_guesses)
    http_counts: Counter = Counter()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    # no /docs: Swagger's page loads from a CDN, and nothing here may need the internet
    app = FastAPI(title="tritlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.api = scheduler, api
    app.state.metrics = functools.partial(metric_families, scheduler, http_counts)
    app.add_middleware(_Guard, api_key=api_key, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)
    app.add_middleware(_CountRequests, counts=http_counts)  # outermost: it counts the Guard's refusals too

    @app.exception_handler(ServerError)
    async def server_error(request, e: ServerError):
        return _error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error(ServerError(e.status_code, str(e.detail), kind))

    v1 = APIRouter(prefix="/v1")  # the API key is checked by _Guard, before the body is read

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [api.model_card()]}

    @v1.get("/models/{model:path}")
    async def model(model: str):
        api.check_model(model)
        return api.model_card()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await api.generate(await _parse(request, ChatRequest), request, chat=True)

    @v1.post("/completions")
    async def completions(request: Request):
        return await api.generate(await _parse(request, CompletionRequest), request, chat=False)

    @v1.post("/embeddings")
    async def embeddings(request: Request):
        return await api.embed(await _parse(request, EmbeddingRequest), request)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        alive = scheduler.alive  # False if the engine thread died: then this server is of no use
        return JSONResponse({"status": "ok" if alive else "error", "model": api.model_id} | scheduler.state(),
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus_text(app.state.metrics()), media_type="text/plain; version=0.0.4")

    chat_page = resources.files(__package__).joinpath("chat.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(chat_page)

    return app


class _API:
    """What the endpoints do, with the model and the scheduler at hand."""

    def __init__(self, llm, scheduler: Scheduler, model_id: str, ctx: int, max_tokens: int,
                 temperature: float, system_prompt: str | None, speculative: str | None, max_guesses: int):
        self.llm, self.tokenizer, self.scheduler = llm, llm.tokenizer, scheduler
        self.speculative, self.max_guesses = speculative, max_guesses
        self.model_id, self.ctx, self.max_tokens = model_id, ctx, max_tokens
        self.temperature, self.system_prompt = temperature, system_prompt
        self.created = int(time.time())
        # a token stands for at most this many bytes, so no text of more characters than
        # ctx * longest fits a slot: longer ones are refused without being tokenized
        longest = max(len(self.tokenizer.token_bytes(t)) for t in range(self.tokenizer.vocab_size))
        self.max_chars = ctx * max(longest, 1)

    def model_card(self) -> dict:
        """OpenAI's model object, and whether the model can generate text (an embedding model
        can't: the chat page says so)."""
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "tritlm",
                "can_generate": self.llm.can_generate}

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_id:
            raise ServerError(404, f"The model '{name}' does not exist; this server serves "
                              f"'{self.model_id}'", param="model", code="model_not_found")

    # ------------------------------------------------------------------ prompts
    # check_* run on the event loop and must stay cheap; *_ids tokenize, in a worker thread

    def check_length(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise ServerError(400, f"'{param}' is far too long ({chars} characters) for this server's "
                              f"context of {self.ctx} tokens per request", param=param,
                              code="context_length_exceeded")

    def encode(self, text: str, param: str) -> list[int]:
        bos = self.tokenizer.bos_id
        bos_text = "" if bos is None else self.tokenizer.token_text(bos)
        ids = self.llm.tokenize(text, add_bos=not (bos_text and text.startswith(bos_text)), special=True)
        return self.check_ids(ids, param)

    def check_ids(self, ids: list[int], param: str, room: int = 1) -> list[int]:
        """Token ids that fit a slot, leaving `room` positions (for the generated tokens)."""
        if not ids:
            raise ServerError(400, f"'{param}' is empty", param=param)
        vocab = self.llm.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ServerError(400, f"token ids in '{param}' must be in [0, {vocab})", param=param)
        if len(ids) + room > self.ctx:
            raise ServerError(400, f"'{param}' has {len(ids)} tokens; this server's context holds "
                              f"{self.ctx} per request", param=param, code="context_length_exceeded")
        return ids

    def chat_messages(self, body: ChatRequest) -> list[dict]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    | ({"name": m.name} if m.name else {}) for m in body.messages]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        self.check_length(sum(len(m["content"]) for m in messages), "messages")
        return messages

    def chat_ids(self, messages: list[dict], fit_reply: int | None = None) -> tuple[list[int], int]:
        """The prompt's ids, and how many of the oldest messages were dropped to leave room for a
        reply of `fit_reply` tokens (None: none are dropped)."""
        dropped = 0
        try:
            if fit_reply is not None:
                messages, dropped = self.llm.fit_chat(messages, fit_reply, self.ctx)
            prompt = self.llm.chat_prompt(messages)
        except ValueError as e:  # the template refused them (a role it lacks, raise_exception...), or
            code = "context_length_exceeded" if "do not fit" in str(e) else None  # the last turn can't fit
            raise ServerError(400, f"the chat format refused the messages: {e}" if code is None else str(e),
                              param="messages", code=code) from e
        return self.encode(prompt, "messages"), dropped

    def completion_prompts(self, body: CompletionRequest) -> list[str] | list[list[int]]:
        """The prompts, as texts or token-id lists."""
        p = body.prompt
        prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else p
        if isinstance(prompts[0], str):
            for text in prompts:
                self.check_length(len(text), "prompt")
        return prompts

    def completion_ids(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        return [self.encode(p, "prompt") if isinstance(p, str) else self.check_ids(list(p), "prompt")
                for p in prompts]

    # --------------------------------------------------------------- generation

    async def generate(self, body, request: Request, chat: bool):
        self.check_model(body.model)
        if not self.llm.can_generate:
            raise ServerError(400, embeddings.CANNOT_GENERATE, code="model_cannot_generate")
        if not chat and body.echo:
            raise ServerError(400, "echo is not supported", param="echo")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        if stop and not all(stop):
            raise ServerError(400, "stop strings must not be empty", param="stop")
        dropped = 0
        if chat:
            messages = self.chat_messages(body)
            requested = body.max_completion_tokens or body.max_tokens
            fit = None if body.truncate is None else requested or (
                self.max_tokens if 0 < self.max_tokens < self.ctx // 2 else self.ctx // 4)
            ids, dropped = await run_in_threadpool(self.chat_ids, messages, fit)
            prompts = [ids]
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            texts = self.completion_prompts(body)
            self.scheduler.check_size(len(texts) * body.n, "n" if body.n > 1 else "prompt")
            prompts = await run_in_threadpool(self.completion_ids, texts)
            requested, top = body.max_tokens, body.logprobs
        t = self.temperature if body.temperature is None else body.temperature
        speculative = (self.speculative if body.speculative is None else
                       (self.speculative or "lookup") if body.speculative else None)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_id} | ({"dropped_messages": dropped} if dropped else {})
        run = _Run()
        jobs = []
        for ids in prompts:
            room = self.ctx - len(ids)
            limit = requested or (self.max_tokens if self.max_tokens > 0 else room)
            for j in range(body.n):
                params = SamplingParams(
                    temperature=t, top_p=_or(body.top_p, 1.0), top_k=_or(body.top_k, 0),
                    min_p=_or(body.min_p, 0.0), repeat_penalty=_or(body.repeat_penalty, 1.0),
                    presence_penalty=_or(body.presence_penalty, 0.0),
                    frequency_penalty=_or(body.frequency_penalty, 0.0),
                    seed=None if body.seed is None else body.seed + j)  # choices differ, reproducibly
                jobs.append(Job(prompt=ids, on_event=run.sink(len(jobs)), params=params,
                                max_tokens=min(limit, room), stop=stop, ignore_eos=body.ignore_eos,
                                logprobs=top, speculative=speculative,
                                max_guesses=self.max_guesses, id=head["id"]))
        self.scheduler.submit(jobs)
        shape = _Shape(self, chat, head, sum(len(ids) for ids in prompts))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(run, jobs, shape, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.ensure_future(self._watch(request, jobs))
        try:
            texts, logprobs, finish = [""] * len(jobs), [[] for _ in jobs], [None] * len(jobs)
            async for index, event in run.events(len(jobs)):
                if event.error:
                    raise event.error
                texts[index] += event.text
                logprobs[index] += event.logprobs
                if event.finish_reason:
                    finish[index] = event.finish_reason
                    shape.completion_tokens += event.completion_tokens
            return shape.response(texts, logprobs, finish, top is not None)
        finally:
            watcher.cancel()
            self.scheduler.cancel(jobs)  # a no-op for finished jobs

    async def _watch(self, request: Request, jobs: list[Job]) -> None:
        """Cancel the jobs as soon as the client hangs up (the engine frees their slots)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.scheduler.cancel(jobs)

    async def _sse(self, run: _Run, jobs: list[Job], shape: _Shape, include_usage: bool):
        try:
            if shape.chat:
                for index in range(len(jobs)):
                    yield _data(shape.chunk(index, {"role": "assistant", "content": ""}, None, None, include_usage))
            async for index, event in run.events(len(jobs)):
                if event.error:
                    yield _data({"error": _error_body(event.error)})
                    break
                if event.text or event.logprobs:
                    yield _data(shape.chunk(index, event.text, event.logprobs, None, include_usage))
                if event.finish_reason:
                    shape.completion_tokens += event.completion_tokens
                    yield _data(shape.chunk(index, "", [], event.finish_reason, include_usage))
            else:
                if include_usage:
                    yield _data(shape.head | {"object": shape.chunk_object, "choices": [], "usage": shape.usage()})
            yield "data: [DONE]\n\n"
        except Exception:  # a fault in shaping this stream: it alone ends, with an error event
            log.exception("request %s failed", shape.head["id"])
            yield _data({"error": _error_body(internal_error(shape.head["id"]))})
            yield "data: [DONE]\n\n"
        finally:  # the stream ended, or the client left (starlette cancels this generator)
            self.scheduler.cancel(jobs)

    # ---------------------------------------------------------------- embeddings

    async def embed(self, body: EmbeddingRequest, request: Request):
        self.check_model(body.model)
        try:
            embeddings.check_dimensions(body.dimensions, self.llm.config.hidden_size)
        except ValueError as e:
            raise ServerError(400, str(e), param="dimensions") from None
        x = body.input
        items = [x] if isinstance(x, str) or isinstance(x[0], int) else x  # at most 2048 (the protocol's cap)
        if isinstance(items[0], str):
            if not all(items):
                raise ServerError(400, "'input' must not contain empty strings", param="input")
            for text in items:
                self.check_length(len(text), "input")
        inputs = await run_in_threadpool(self.embedding_ids, items)
        run = _Run()
        job = Job(prompt=[], inputs=inputs, on_event=run.sink(0), id=f"emb-{uuid.uuid4().hex}")
        self.scheduler.submit([job])
        watcher = asyncio.ensure_future(self._watch(request, [job]))
        try:
            async for _, event in run.events(1):
                if event.error:
                    raise event.error
                vectors = event.embeddings
        finally:
            watcher.cancel()
            self.scheduler.cancel([job])
        vectors = embeddings.finish(np.stack(vectors), dimensions=body.dimensions)
        return embeddings.openai_response(vectors, self.model_id, sum(map(len, inputs)), body.encoding_format)

    def embedding_ids(self, items: list[str] | list[list[int]]) -> list[list[int]]:
        return [self.check_ids(self.llm.embedding_tokens(t) if isinstance(t, str) else list(t), "input", room=0)
                for t in items]

    # -------------------------------------------------------------------- tokens

    def token_entry(self, token: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


class _Run:
    """One request's event queue: the engine thread's callbacks put (choice index, Event) on it."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, index: int):
        def put(event):
            if not self.loop.is_closed():  # the server may be gone while the engine finishes up
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return put

    async def events(self, n: int):
        """Events until each of the n jobs has sent its last."""
        while n:
            index, event = await self.queue.get()
            n -= event.last
            yield index, event


class _Shape:
    """The OpenAI shapes of one request's responses (chat or legacy completions)."""

    def __init__(self, api: _API, chat: bool, head: dict, prompt_tokens: int):
        self.api, self.chat, self.head = api, chat, head
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.offsets: Counter = Counter()  # completions' text_offset, per choice

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def logprobs(self, index: int, entries: list) -> dict:
        e = self.api.token_entry
        if self.chat:
            return {"content": [e(t, lp) | {"top_logprobs": [e(a, la) for a, la in top]}
                                for t, lp, top in entries]}
        tokens = [e(t, lp)["token"] for t, lp, _ in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(token)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{e(a, la)["token"]: la for a, la in top} for _, _, top in entries],
                "text_offset": offsets}

    def chunk(self, index: int, content, entries, finish_reason, include_usage: bool) -> dict:
        logprobs = self.logprobs(index, entries) if entries else None
        if self.chat:
            delta = content if isinstance(content, dict) else ({"content": content} if content else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": content, "logprobs": logprobs, "finish_reason": finish_reason}
        return self.head | {"object": self.chunk_object, "choices": [choice]} | \
            ({"usage": None} if include_usage else {})

    def response(self, texts, logprobs, finish, with_logprobs: bool) -> dict:
        choices = []
        for index, (text, entries, reason) in enumerate(zip(texts, logprobs, finish)):
            lp = self.logprobs(index, entries) if with_logprobs else None
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": reason} if self.chat else
                           {"index": index, "text": text, "logprobs": lp, "finish_reason": reason})
        kind = "chat.completion" if self.chat else "text_completion"
        return self.head | {"object": kind, "choices": choices, "usage": self.usage(),
                            "system_fingerprint": None}


def _or(value, default):
    return default if value is None else value


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_body(e: ServerError) -> dict:
    return {"message": e.message, "type": e.type, "param": e.param, "code": e.code}


def _error(e: ServerError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse({"error": _error_body(e)}, status_code=e.status, headers=headers)


async def _parse(request: Request, model):
    """The request's body as `model` (a protocol class), or a 400."""
    raw = await request.body()
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_CONTAINERS:
        raise ServerError(400, f"the request body holds over {MAX_JSON_CONTAINERS} '[' and '{{' (JSON arrays "
                          "and objects, or in strings); send fewer messages, prompts or inputs at once",
                          code="body_too_complex")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad JSON or UTF-8, digits past Python's limit, deep nesting
        raise ServerError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ServerError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _validation_error(errors: list[dict]) -> ServerError:
    # a union field reports each member's error; the telling one is from the member whose shape
    # the value had (not a type mismatch), the deepest: ["ok", 7] is a list[str] wrong at [1]
    field = [x for x in errors if x.get("loc", ())[:1] == errors[0].get("loc", ())[:1]]
    first = max(field, key=lambda x: (not x.get("type", "").endswith("_type"), len(x.get("loc", ()))))
    loc = [str(part) for part in first.get("loc", ())]
    # a union's error names the member tried in loc ("str", "list[int]", "TextPart"): drop those
    param = ".".join(p for p in loc if p not in ("str", "int", "float", "bool") and "[" not in p
                     and not p[:1].isupper()) or None
    message = first.get("msg", "invalid request")
    return ServerError(400, f"{param}: {message}" if param else message, param=param,
                       code="missing_required_parameter" if first.get("type") == "missing" else None)


class _CountRequests:
    """ASGI middleware counting HTTP requests by route and status, for /metrics (a plain ASGI
    wrapper: starlette's BaseHTTPMiddleware would get in the way of streaming)."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health",
              "/metrics", "/")

    def __init__(self, app, counts: Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [499]  # nginx's "client closed request": it left (or was cut off) before any answer;
        # a fault below answers 500 (in _Guard)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            route = path if path in self.ROUTES else "/v1/models" if path.startswith("/v1/models/") else "other"
            self.counts[(route, status[0])] += 1


class _Guard:
    """ASGI middleware: what a request must pass before the API parses anything (a 40 MB body
    without a key costs nothing), in order: its Host header (a DNS-rebinding page sends its own
    name), the API key (on /v1/*), the body's size (by Content-Length, then counted as it comes);
    then the body, read whole here, goes on to the API. It also turns a fault anywhere below into
    a 500 that says nothing but "internal error" and a request id, the traceback going to the log."""

    def __init__(self, app, *, api_key: str | None, allowed_hosts: list[str] | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.hosts = None if allowed_hosts is None or "*" in allowed_hosts else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check(scope)
            body = await self._body(receive)
        except ServerError as e:
            response = _error(e)
            response.headers["connection"] = "close"  # what is left of the body stays unread
            return await response(scope, receive, send)
        if body is None:  # the client left
            return
        started = False

        async def replay():  # the body, then whatever comes next (a disconnect)
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        async def send_started(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, send_started)
        except Exception:
            if started:  # too late for a response: uvicorn logs it and drops the connection
                raise
            request_id = uuid.uuid4().hex
            log.exception("request %s failed", request_id)
            await _error(internal_error(request_id))(scope, receive, send)

    def _check(self, scope) -> None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.hosts is not None and _hostname(host) not in self.hosts:
            raise ServerError(400, f"this server does not answer to the host name {host!r} (allowed: "
                              f"{', '.join(sorted(self.hosts))}; see --allowed-hosts)", code="invalid_host")
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise ServerError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                  code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise self._too_large()

    async def _body(self, receive) -> bytes | None:
        """The whole body; None if the client left first."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _too_large(self) -> ServerError:
        return ServerError(413, f"the request body is larger than this server's limit of "
                           f"{self.max_body_bytes} bytes", code="request_too_large")


def _hostname(host: str) -> str:
    """The name in a Host header, without the port: "[::1]:8080" -> "[::1]"."""
    name = host[: host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]
    return name.lower()


def metric_families(scheduler: Scheduler, http_counts: Counter) -> list[tuple[str, str, str, list]]:
    """What /metrics reports, as (name, "counter" or "gauge", help, [(labels, value), ...]); the
    names without the `tritlm_` prefix. `app.state.metrics()` gives them (tritlm.cluster exports
    the same to Ray's metrics)."""
    m, state = scheduler.metrics, scheduler.state()
    return [
        ("http_requests_total", "counter", "HTTP requests by route and status.",
         [({"route": r, "status": s}, n) for (r, s), n in sorted(http_counts.items())]),
        ("sequences_total", "counter", "Generations (one per choice) and embedding jobs, by outcome.",
         [({"outcome": k}, v) for k, v in m.requests.items()]),
        ("prompt_tokens_total", "counter", "Prompt tokens computed (reused cached prefixes not counted).",
         [({}, m.prompt_tokens)]),
        ("completion_tokens_total", "counter", "Tokens generated.", [({}, m.completion_tokens)]),
        ("speculative_proposed_tokens_total", "counter",
         "Guesses of the next tokens verified (speculative decoding).", [({}, m.proposed_tokens)]),
        ("speculative_accepted_tokens_total", "counter", "Guesses the model accepted.", [({}, m.accepted_tokens)]),
        ("engine_steps_total", "counter", "Engine steps (one batched forward each).", [({}, m.steps)]),
        ("queue_depth", "gauge", "Sequences waiting for a slot.", [({}, state["queue"])]),
        ("running_sequences", "gauge", "Sequences holding a slot.", [({}, state["running"])]),
        ("slots_total", "gauge", "Slots (sequences run at once).", [({}, state["slots_total"])]),
        ("batch_size", "gauge", "Sequences advanced by the last engine step.", [({}, m.batch_size)]),
        ("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
         [({}, round(m.tokens_per_second(), 3))]),
        ("uptime_seconds", "gauge", "Seconds since the server started.", [({}, round(time.time() - m.started, 1))]),
    ]


def _prometheus_text(families: list[tuple[str, str, str, list]]) -> str:
    lines = []
    for name, kind, help, samples in families:
        lines.extend([f"# HELP tritlm_{name} {help}", f"# TYPE tritlm_{name} {kind}"])
        for labels, value in samples:
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"tritlm_{name}{label} {value}")
    return "\n".join(lines) + "\n"
