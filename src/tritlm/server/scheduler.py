"""Continuous batching: one engine thread owns the Engine and, step after step, advances every
active request with ONE `Engine.forward` call, so the weights are streamed once per step for all
of them. New requests join between steps; a newcomer's prompt is fed in chunks of at most
`prefill_chunk` tokens per step, so the requests already decoding keep getting a token per step.

A request may also decode speculatively (`Job.speculative`): its step feeds its last token and the
guesses of its proposer (prompt lookup, or the draft model's engine running in a sequence of the
slot's own), beside the other requests' tokens in the same forward; `speculative.verify` keeps
those its sampler accepts, and its slot forgets the rest.

Each generation holds a slot: one of `max_batch` preallocated sequences of `ctx_per_slot` tokens,
reused for the next request (rewound to the longest prompt prefix it already holds). Requests wait
in a bounded FIFO queue for a slot. Cancelling (a client left) frees the slot at the next step
boundary; a request past its deadline ends with a timeout error.

Everything a request produces reaches its `on_event` callback, called on the engine thread.

A fault is confined to what it touches: one request's admission, sampling, text or callback fails
that request alone; a failed forward pass fails the requests in that step. Either way the client
gets an opaque 500 and the traceback goes to the log. Should the engine thread die all the same,
every waiting request fails at once, new ones are refused (503) and `alive` turns False.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import embeddings
from ..generation import TextStream
from ..sampling import Sampler, SamplingParams
from ..speculative import DraftProposer, LookupProposer, common_prefix, propose_all, verify

log = logging.getLogger("tritlm.server")


class ServerError(Exception):
    """An error for the client: HTTP status, and OpenAI's error `type`, `param` and `code`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def internal_error(request_id: str) -> ServerError:
    """What a client is told of a fault on the server's side; the details go to the log only."""
    return ServerError(500, f"internal error (request {request_id})", "server_error")


@dataclass
class Event:
    """What a job reports: text (with the logprobs of the tokens it completes), then on its last
    event a finish_reason (or an error); an embedding job reports its inputs' pooled vectors (not
    normalised: `embeddings.finish` does that)."""

    text: str = ""
    logprobs: list = field(default_factory=list)  # (token, logprob, [(token, logprob), ...]) per token
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: ServerError | None = None
    embeddings: list[np.ndarray] | None = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None or self.embeddings is not None


@dataclass(eq=False)
class Job:
    """One sequence's work: a completion choice, or (inputs given) embeddings of token lists."""

    prompt: list[int]
    on_event: Callable[[Event], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16
    stop: list[str] | None = None
    ignore_eos: bool = False  # for benchmarks: end-of-turn tokens don't end the text
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the top k
    speculative: str | None = None  # "lookup" (prompt lookup) or "draft" (the draft model): guesses verified
    max_guesses: int = 8  # speculative decoding's guesses a step, at most
    inputs: list[list[int]] | None = None  # an embedding job: the pooled vector of each
    timeout: float | None = None  # seconds from submission
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # names it in the log
    # state, owned by the engine thread once submitted
    cancelled: bool = False
    finished: bool = False
    slot: int | None = None
    fed: int = 0  # prompt tokens in the cache
    deadline: float = float("inf")

    @property
    def embedding(self) -> bool:
        return self.inputs is not None


class Metrics:
    """Counters for /metrics; written by the engine thread, read by the server."""

    def __init__(self):
        self.started = time.time()
        self.requests = {"completed": 0, "cancelled": 0, "timeout": 0, "error": 0, "rejected": 0}
        self.prompt_tokens = 0  # computed (prefilled), not counting reused prefixes
        self.completion_tokens = 0
        self.proposed_tokens = self.accepted_tokens = 0  # speculative decoding's guesses
        self.steps = 0
        self.batch_size = 0  # sequences in the last step
        self.window = deque()  # (time, tokens generated) of recent steps, for tokens/s

    def step(self, batch: int, generated: int) -> None:
        now = time.monotonic()
        self.steps += 1
        self.batch_size = batch
        self.completion_tokens += generated
        self.window.append((now, generated))
        while self.window and now - self.window[0][0] > 10:
            self.window.popleft()

    def tokens_per_second(self) -> float:
        """Tokens generated in the last 10 seconds, per second."""
        now = time.monotonic()
        return sum(n for t, n in list(self.window) if now - t <= 10) / 10


class _Running:
    """The engine-thread state of a job holding a slot."""

    def __init__(self, job: Job, tokenizer, draft: tuple | None):
        self.job = job
        self.next_token: int | None = None  # sampled, not yet in the cache
        if job.embedding:
            self.next_input = 0  # the first input not yet started
            self.current: _Input | None = None  # the one started, cut short by the last step's budget
            self.vectors: list[np.ndarray | None] = [None] * len(job.inputs)
            self.pooled = 0  # inputs done
            return
        self.context = list(job.prompt)  # prompt + generated: the sampler's penalty window
        self.sampler = Sampler(job.params)
        self.proposer = (LookupProposer(k_max=job.max_guesses) if job.speculative == "lookup" else
                         DraftProposer(*draft, k_max=job.max_guesses) if job.speculative == "draft" else None)
        self.stream = TextStream(tokenizer, max_tokens=job.max_tokens, stop=job.stop,
                                 stop_ids=set() if job.ignore_eos else None)
        self.pending_logprobs: list = []


@dataclass(eq=False)
class _Input:
    """An embedding input under way: the sequence it runs in (its own, of its length), and the
    hidden-state rows its chunks have given so far."""

    index: int
    sequence: object
    rows: list = field(default_factory=list)


class Scheduler:
    def __init__(self, engine, tokenizer, *, max_batch: int = 8, max_queue: int = 64,
                 ctx_per_slot: int = 2048, prefill_chunk: int = 64, timeout: float | None = 600.0,
                 draft_engine=None):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be at least 1, max_queue at least 0")
        self.engine, self.tokenizer = engine, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.ctx_per_slot, self.prefill_chunk, self.timeout = ctx_per_slot, prefill_chunk, timeout
        self.slots = [engine.new_sequence(ctx_per_slot) for _ in range(max_batch)]
        self.slot_tokens = [[] for _ in range(max_batch)]  # what each slot's cache holds
        # the draft model's sequence of each slot, and what it holds (jobs with speculative="draft")
        self.draft_slots = [(draft_engine, draft_engine.new_sequence(ctx_per_slot), [])
                            for _ in range(max_batch)] if draft_engine else None
        self.free = list(range(max_batch))
        self.waiting: deque[Job] = deque()
        self.running: dict[Job, _Running] = {}  # insertion order = admission order (FIFO)
        self.metrics = Metrics()
        self._cond = threading.Condition()
        self._stopping = False
        self._ended: ServerError | None = None  # once the engine loop has ended: what submit says
        self._thread = threading.Thread(target=self._loop, name="tritlm-engine", daemon=True)

    # ------------------------------------------------------------------ any thread

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (a request's choices) all together, or raise ServerError 429 if the queue
        can't take them (400 if it never could)."""
        with self._cond:
            if self._ended:
                raise self._ended
            self.check_size(len(jobs))
            if len(self.waiting) + len(jobs) > self.max_queue + len(self.free):
                self.metrics.requests["rejected"] += 1
                raise ServerError(429, "the server is busy: too many requests queued; retry later",
                                  type="rate_limit_error", code="queue_full")
            now = time.monotonic()
            for job in jobs:
                timeout = job.timeout if job.timeout is not None else self.timeout
                job.deadline = now + timeout if timeout else float("inf")
                self.waiting.append(job)
            self._cond.notify_all()

    def check_size(self, sequences: int, param: str = "n") -> None:
        """ServerError 400 if a request of this many sequences could never be queued."""
        if sequences > self.max_batch + self.max_queue:
            raise ServerError(400, f"the request needs {sequences} sequences; this server runs "
                              f"{self.max_batch} at once and queues {self.max_queue}", param=param)

    def cancel(self, jobs: list[Job]) -> None:
        """Drop jobs (the client left): a queued job leaves the queue now, a running one frees its
        slot before the next step."""
        with self._cond:
            for job in jobs:
                if job.finished or job.cancelled:
                    continue
                job.cancelled = True
                if job in self.waiting:
                    self.waiting.remove(job)
                    job.finished = True
                    self.metrics.requests["cancelled"] += 1
            self._cond.notify_all()

    def state(self) -> dict:
        with self._cond:
            return {"slots_total": self.max_batch, "slots_busy": self.max_batch - len(self.free),
                    "queue": len(self.waiting), "running": len(self.running)}

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running: False before start, after stop, or if it died."""
        return self._thread.is_alive() and self._ended is None

    # --------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException:  # the thread ends here either way; the log says why
            log.exception("the engine thread died")
        finally:  # nobody may wait for a thread that is gone
            with self._cond:
                self._ended = (ServerError(503, "the server is shutting down", "server_error")
                               if self._stopping else
                               ServerError(503, "the engine has stopped (see the server log)", "server_error",
                                           code="engine_stopped"))
                self._fail_all(self._ended)

    def _turn(self) -> bool:
        """Admit what fits, then one step; False when stopping."""
        with self._cond:
            if self._stopping:
                return False
            self._expire()
            self._admit()
            if not self.running:
                self.metrics.batch_size = 0
                wait = min((j.deadline for j in self.waiting), default=float("inf")) - time.monotonic()
                self._cond.wait(timeout=min(max(wait, 0.001), 1.0))
                return True
            running = list(self.running.values())
        try:
            self._step(running)
        except Exception:  # the shared forward failed: every job of the step fails
            log.exception("an engine step failed")
            with self._cond:
                for r in running:
                    self.slots[r.job.slot].truncate(0)  # the cache may be half-written
                    self.slot_tokens[r.job.slot].clear()
                    self._finish(r, Event(error=internal_error(r.job.id)))
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        for job in [j for j in self.waiting if j.deadline <= now]:
            self.waiting.remove(job)
            job.finished = True
            self.metrics.requests["timeout"] += 1
            _notify(job, Event(error=ServerError(503, "timed out waiting for a free slot", "server_error",
                                                 code="timeout")))
        for r in list(self.running.values()):
            if r.job.cancelled:
                self._release(r)
                self.metrics.requests["cancelled"] += 1
            elif r.job.deadline <= now:
                self.metrics.requests["timeout"] += 1
                self._finish(r, Event(error=ServerError(504, "the request timed out", "server_error",
                                                        code="timeout")), count=False)

    def _admit(self) -> None:
        while self.free and self.waiting:
            job = self.waiting.popleft()
            # the free slot that already holds the longest start of this prompt
            slot = max(self.free, key=lambda s: common_prefix(self.slot_tokens[s], job.prompt))
            self.free.remove(slot)
            job.slot = slot
            if not job.embedding:  # an embedding job holds a slot for its turn, not its sequence
                job.fed = common_prefix(self.slot_tokens[slot], job.prompt[:-1])
                self.slots[slot].truncate(job.fed)
                del self.slot_tokens[slot][job.fed:]
            try:
                self.running[job] = _Running(job, self.tokenizer, self.draft_slots and self.draft_slots[slot])
            except Exception:
                log.exception("request %s could not start", job.id)
                job.finished = True
                self.free.append(slot)
                self.metrics.requests["error"] += 1
                _notify(job, Event(error=internal_error(job.id)))

    def _step(self, running: list[_Running]) -> None:
        """One engine step: every decoding job gets one token (and its guesses verified, if it has
        a proposer), prefilling ones share a budget of prompt tokens (larger when nobody is
        decoding, as nobody waits then)."""
        decoding = [r for r in running if r.next_token is not None]
        budget = self.prefill_chunk if decoding else max(self.prefill_chunk, self.engine.prefill_chunk)
        proposing = [r for r in decoding if r.proposer]  # (draft models run for all in shared steps)
        guesses = dict(zip(map(id, proposing), propose_all([(r.proposer, r.context, self._room(r)) for r in proposing])))
        batch, fed = [], []  # fed: (job, its tokens, how many of them are guesses)
        for r in running:
            job = r.job
            if job.embedding:
                continue
            if r.next_token is not None:
                batch.append((self.slots[job.slot], [r.next_token] + guesses.get(id(r), [])))
                fed.append((r, batch[-1][1], len(batch[-1][1]) - 1))
            elif budget > 0:
                chunk = job.prompt[job.fed : job.fed + budget]
                budget -= len(chunk)
                batch.append((self.slots[job.slot], chunk))
                fed.append((r, chunk, 0))
        logits = self.engine.forward(batch, all_logits=[n > 0 for _, _, n in fed]) if batch else []
        embedding = [r for r in running if r.job.embedding]
        if embedding and budget > 0:
            try:
                self._embed_step(embedding, budget)
            except Exception:  # the shared pass failed: every embedding job in it fails
                for r in embedding:
                    self._fail(r)
        generated = 0  # sampling runs without the lock: the server keeps answering meanwhile
        for (r, tokens, n), rows in zip(fed, logits):
            self.slot_tokens[r.job.slot].extend(tokens)
            if r.next_token is None:
                r.job.fed += len(tokens)
                self.metrics.prompt_tokens += len(tokens)
                if r.job.fed < len(r.job.prompt):
                    continue
            if r.job.cancelled:  # left during the step: don't sample for nobody
                continue
            try:
                generated += self._advance(r, rows, tokens[len(tokens) - n:] if n else [])
            except Exception:
                self._fail(r)
        self.metrics.step(len(batch), generated)

    def _room(self, r: _Running) -> int:
        """The most guesses worth feeding with the job's next token: what its slot has room for
        and its max_tokens still allows after that token."""
        return min(self.ctx_per_slot - self.slots[r.job.slot].position, r.job.max_tokens - len(r.stream.tokens)) - 1

    def _advance(self, r: _Running, rows: np.ndarray, guesses: list[int]) -> int:
        """Choose the job's next tokens from its logits rows (after its last token fed, and after
        each guess), forget the guesses rejected, report the tokens; how many were reported."""
        job, slot = r.job, self.slots[r.job.slot]
        chosen = verify(r.sampler, rows, guesses, r.context)
        if guesses:
            slot.truncate(slot.position - (len(guesses) + 1 - len(chosen)))
            del self.slot_tokens[job.slot][slot.position:]
            r.proposer.record(len(guesses), len(chosen) - 1)
            self.metrics.proposed_tokens += len(guesses)
            self.metrics.accepted_tokens += len(chosen) - 1
        text, reported = "", 0
        for token, logits in zip(chosen, rows):
            if job.logprobs is not None:
                r.pending_logprobs.append(_logprobs(logits, token, job.logprobs))
            text += r.stream.push(token)
            reported += 1
            if r.stream.finish_reason:
                break
        if not r.stream.finish_reason and slot.position >= self.ctx_per_slot:
            text += r.stream.finish("length")  # the slot is full: no room for the last token
        r.next_token = chosen[-1]
        event = Event(text=text, logprobs=r.pending_logprobs, completion_tokens=len(r.stream.tokens))
        if r.stream.finish_reason:
            event.finish_reason = r.stream.finish_reason
            self._finish(r, event)
        elif text:  # logprobs of tokens without text yet wait for the text they complete
            r.pending_logprobs = []
            job.on_event(event)
        return reported

    def _embed_step(self, running: list[_Running], budget: int) -> None:
        """Advance the embedding jobs by at most `budget` tokens in one batched pass: the input
        a job had under way first, then its next ones, each in a sequence of its own; an input
        whose last token is in gets its pooled vector, a job whose inputs all have them finishes."""
        parts = []  # (job's state, input, its tokens this step)
        for r in running:
            while budget > 0 and (r.current or r.next_input < len(r.job.inputs)):
                if r.current is None:
                    tokens = r.job.inputs[r.next_input]
                    r.current = _Input(r.next_input, self.engine.new_sequence(len(tokens)))
                    r.next_input += 1
                item, tokens = r.current, r.job.inputs[r.current.index]
                chunk = tokens[item.sequence.position : item.sequence.position + budget]
                budget -= len(chunk)
                if item.sequence.position + len(chunk) == len(tokens):
                    r.current = None  # done after this step
                parts.append((r, item, chunk))
        pooling = self.engine.config.pooling
        hidden = self.engine.forward_hidden([(item.sequence, chunk) for _, item, chunk in parts],
                                            embeddings.all_rows(pooling))
        for (r, item, chunk), rows in zip(parts, hidden):
            self.metrics.prompt_tokens += len(chunk)
            item.rows.append(rows)
            if item.sequence.position == len(r.job.inputs[item.index]):
                r.vectors[item.index] = embeddings.pool(np.concatenate(item.rows), pooling)
                r.pooled += 1
        for r in running:
            if r.pooled == len(r.job.inputs):
                self._finish(r, Event(embeddings=r.vectors))

    def _fail(self, r: _Running) -> None:
        """Fail one job over a fault in its own work (call it from the except block)."""
        log.exception("request %s failed", r.job.id)
        self._finish(r, Event(error=internal_error(r.job.id)))

    def _finish(self, r: _Running, event: Event, count: bool = True) -> None:
        with self._cond:
            if r.job not in self.running:
                return
            self._release(r)
            if count:
                self.metrics.requests["error" if event.error else "completed"] += 1
        _notify(r.job, event)

    def _release(self, r: _Running) -> None:
        with self._cond:
            r.job.finished = True
            del self.running[r.job]
            self.free.append(r.job.slot)
            self._cond.notify_all()

    def _fail_all(self, error: ServerError) -> None:
        for r in list(self.running.values()):
            self._finish(r, Event(error=error))
        while self.waiting:
            job = self.waiting.popleft()
            job.finished = True
            _notify(job, Event(error=error))


def _notify(job: Job, event: Event) -> None:
    """Send a job its last event: a callback that fails then is only logged (there is nothing
    left to fail)."""
    try:
        job.on_event(event)
    except Exception:
        log.exception("request %s: its event callback failed", job.id)


def _logprobs(logits: np.ndarray, token: int, k: int) -> tuple:
    """The chosen token's log-probability under the model (before penalties and temperature),
    and the k most likely tokens'."""
    x = logits.astype(np.float64)
    lse = x.max() + np.log(np.exp(x - x.max()).sum())
    top = np.argpartition(-x, k)[:k] if 0 < k < len(x) else np.arange(min(k, len(x)))
    top = top[np.argsort(-x[top], kind="stable")]
    return token, float(x[token] - lse), [(int(t), float(x[t] - lse)) for t in top]
