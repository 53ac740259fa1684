"""The OpenAI-compatible HTTP API over a `Scheduler`: request checking, prompts, responses shaped
like OpenAI's (server-sent events when streaming), errors as OpenAI error objects."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..chat import ChatTemplateError
from ..sampling import SamplingParams
from .protocol import ChatRequest, CompletionRequest, EmbeddingRequest
from .scheduler import Job, Scheduler, ServerError


def create_app(llm, *, api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
               ctx_per_slot: int | None = None, max_tokens: int = 512, temperature: float = 0.8,
               system_prompt: str | None = None, prefill_chunk: int = 64,
               timeout: float | None = 600.0, model_id: str | None = None) -> FastAPI:
    """A FastAPI app serving `llm` (a `tritlm.LLM`). max_tokens and temperature are the defaults
    of requests that give none (max_tokens -1: until the slot's context is full); system_prompt
    starts chats that have no system message."""
    ctx = ctx_per_slot or llm.n_ctx
    scheduler = Scheduler(llm.engine, llm.tokenizer, max_batch=max_batch, max_queue=max_queue,
                          ctx_per_slot=ctx, prefill_chunk=prefill_chunk, timeout=timeout)
    api = _API(llm, scheduler, model_id or llm.model_name, ctx, max_tokens, temperature, system_prompt)
    http_counts: Counter = Counter()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    # no /docs: Swagger's page loads from a CDN, and nothing here may need the internet
    app = FastAPI(title="tritlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.api = scheduler, api
    app.add_middleware(_CountRequests, counts=http_counts)

    @app.exception_handler(ServerError)
    async def server_error(request, e: ServerError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return _error(_validation_error(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error(ServerError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):
        return _error(ServerError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ServerError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                              code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [api.model_card()]}

    @v1.get("/models/{model:path}")
    async def model(model: str):
        api.check_model(model)
        return api.model_card()

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await api.generate(body, request, chat=True)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await api.generate(body, request, chat=False)

    @v1.post("/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        return await api.embed(body, request)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": api.model_id} | scheduler.state()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_metrics(scheduler, http_counts), media_type="text/plain; version=0.0.4")

    chat_page = resources.files(__package__).joinpath("chat.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(chat_page)

    return app


class _API:
    """What the endpoints do, with the model and the scheduler at hand."""

    def __init__(self, llm, scheduler: Scheduler, model_id: str, ctx: int, max_tokens: int,
                 temperature: float, system_prompt: str | None):
        self.llm, self.tokenizer, self.scheduler = llm, llm.tokenizer, scheduler
        self.model_id, self.ctx, self.max_tokens = model_id, ctx, max_tokens
        self.temperature, self.system_prompt = temperature, system_prompt
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "tritlm"}

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_id:
            raise ServerError(404, f"The model '{name}' does not exist; this server serves "
                              f"'{self.model_id}'", param="model", code="model_not_found")

    # ------------------------------------------------------------------ prompts

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

    def chat_ids(self, body: ChatRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    | ({"name": m.name} if m.name else {}) for m in body.messages]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            return self.encode(self.llm.chat_prompt(messages), "messages")
        except ChatTemplateError as e:
            raise ServerError(400, f"the chat template failed: {e}", param="messages") from e

    def completion_ids(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str) or (p and isinstance(p[0], str)):
            return [self.encode(text, "prompt") for text in ([p] if isinstance(p, str) else p)]
        if isinstance(p[0], int):
            return [self.check_ids(list(p), "prompt")]
        return [self.check_ids(list(ids), "prompt") for ids in p]

    # --------------------------------------------------------------- generation

    async def generate(self, body, request: Request, chat: bool):
        self.check_model(body.model)
        if not chat and body.echo:
            raise ServerError(400, "echo is not supported", param="echo")
        prompts = [self.chat_ids(body)] if chat else self.completion_ids(body)
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        if stop and not all(stop):
            raise ServerError(400, "stop strings must not be empty", param="stop")
        if chat:
            requested = body.max_completion_tokens or body.max_tokens
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            requested, top = body.max_tokens, body.logprobs
        t = self.temperature if body.temperature is None else body.temperature
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
                                logprobs=top))
        self.scheduler.submit(jobs)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_id}
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
        finally:  # the stream ended, or the client left (starlette cancels this generator)
            self.scheduler.cancel(jobs)

    # ---------------------------------------------------------------- embeddings

    async def embed(self, body: EmbeddingRequest, request: Request):
        self.check_model(body.model)
        hidden = self.llm.config.hidden_size
        if body.dimensions not in (None, hidden):
            raise ServerError(400, f"this model's embeddings have {hidden} dimensions", param="dimensions")
        x = body.input
        if isinstance(x, str) or isinstance(x[0], str):
            texts = [x] if isinstance(x, str) else x
            if not all(texts):
                raise ServerError(400, "'input' must not contain empty strings", param="input")
            inputs = [self.check_ids(self.llm.tokenize(t), "input", room=0) for t in texts]
        else:
            inputs = [self.check_ids(list(ids), "input", room=0) for ids in ([x] if isinstance(x[0], int) else x)]
        if len(inputs) > 2048:
            raise ServerError(400, "at most 2048 inputs per request", param="input")
        run = _Run()
        job = Job(prompt=[], inputs=inputs, on_event=run.sink(0))
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
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                 if body.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        n = sum(len(ids) for ids in inputs)
        return {"object": "list", "data": data, "model": self.model_id,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

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


def _validation_error(e: RequestValidationError) -> ServerError:
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return ServerError(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
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
        status = [500]

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


def _metrics(scheduler: Scheduler, http_counts: Counter) -> str:
    m, state = scheduler.metrics, scheduler.state()
    lines = []

    def metric(name, kind, help, samples):
        lines.extend([f"# HELP tritlm_{name} {help}", f"# TYPE tritlm_{name} {kind}"])
        for labels, value in samples:
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"tritlm_{name}{label} {value}")

    metric("http_requests_total", "counter", "HTTP requests by route and status.",
           [({"route": r, "status": s}, n) for (r, s), n in sorted(http_counts.items())])
    metric("sequences_total", "counter", "Generations (one per choice) and embedding jobs, by outcome.",
           [({"outcome": k}, v) for k, v in m.requests.items()])
    metric("prompt_tokens_total", "counter", "Prompt tokens computed (reused cached prefixes not counted).",
           [({}, m.prompt_tokens)])
    metric("completion_tokens_total", "counter", "Tokens generated.", [({}, m.completion_tokens)])
    metric("engine_steps_total", "counter", "Engine steps (one batched forward each).", [({}, m.steps)])
    metric("queue_depth", "gauge", "Sequences waiting for a slot.", [({}, state["queue"])])
    metric("running_sequences", "gauge", "Sequences holding a slot.", [({}, state["running"])])
    metric("slots_total", "gauge", "Slots (sequences run at once).", [({}, state["slots_total"])])
    metric("batch_size", "gauge", "Sequences advanced by the last engine step.", [({}, m.batch_size)])
    metric("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           [({}, round(m.tokens_per_second(), 3))])
    metric("uptime_seconds", "gauge", "Seconds since the server started.", [({}, round(time.time() - m.started, 1))])
    return "\n".join(lines) + "\n"
