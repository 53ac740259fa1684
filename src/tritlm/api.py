"""`tritlm.LLM`: load a model, generate, chat; shaped like llama-cpp-python's `Llama`."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import numpy as np

from . import chat, embeddings, hub
from .generation import TextStream
from .models import loader
from .runtime import Engine
from .sampling import Sampler, SamplingParams
from .speculative import DraftProposer, LookupProposer, Proposer, common_prefix, verify
from .tokenizer import Tokenizer


def default_model_path() -> str:
    """The tiny model bundled with tritlm (trained on Python's standard library), used when no
    model is given. docs/TRAINING.md says how it was made."""
    path = os.path.join(os.path.dirname(__file__), "data", "tritlm-tiny.gguf")
    if not os.path.isfile(path):
        raise ValueError(f"the bundled model is missing ({path}); give a model path")
    return path


def make_engine(config, tensors: dict, device: str = "cpu", **options) -> Engine:
    """The engine for `device`: "cpu" (the C++ engine) or "cuda" / "cuda:N" (the GPU engine)."""
    if device == "cpu":
        return Engine(config, tensors, **options)
    if device.split(":")[0] == "cuda":
        from .cuda.engine import CudaEngine

        return CudaEngine(config, tensors, device=device, **options)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


class LLM:
    """A ternary model ready to generate.

    model_path: a GGUF file, a Hugging Face model directory, or a Hub id `org/repo` or
    `org/repo:FILE-OR-QUANT` (fetched into the Hub cache once; see `from_pretrained` and
    `tritlm.hub`); default: the bundled tiny model, `default_model_path()`. n_ctx: context length
    (default: the model's, at most 4096). n_threads: default every core other work leaves idle
    (kernels.idle_cores). kv_type: "f16" or "f32". device: "cpu", or "cuda" for the GPU engine
    (`tritlm.cuda`: PyTorch with CUDA and Triton, `pip install 'tritlm[cuda]'`). draft_model: a
    smaller model with the same tokenizer (a path or Hub id as model_path, loaded with the same
    options, or an `LLM`) for speculative="draft". weight_layout: the CPU kernels' "tiles" (2 bits
    per weight) or "tiles5" (1.625: a fifth less memory); default the faster on this CPU. mmap:
    map the packed weights read-only from a cache file written at the first load (beside the
    model, else in ~/.cache/tritlm/weights) instead of copying them into memory: later starts read
    nothing, and a model larger than the memory still runs (GGUF files; runtime/weight_cache.py).
    A model that cannot fit in memory is refused before loading, with what would fit (ValueError).
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, n_ctx: int | None = None,
                 n_threads: int | None = None, kv_type: str = "f16", prefill_chunk: int = 256,
                 device: str = "cpu", draft_model: str | os.PathLike | LLM | None = None,
                 weight_layout: str | None = None, mmap: bool = False):
        model_path = default_model_path() if model_path is None else hub.resolve_model(model_path)
        config, tensors, metadata = loader.load(model_path)
        self.model_path = model_path
        self.model_name = hub.model_name(model_path)
        self.config = config
        self.metadata = metadata
        self.tokenizer = Tokenizer.of_model(model_path, metadata, config.vocab_size)
        # named embedding prompts, as sentence-transformers keeps them (Hugging Face directories)
        self.prompts, self.default_prompt_name = \
            loader.sentence_prompts(model_path) if os.path.isdir(model_path) else ({}, None)
        layout = ({} if weight_layout is None else {"weight_layout": weight_layout}) | ({"mmap": True} if mmap else {})
        if layout and device != "cpu":
            raise ValueError(f"{' and '.join(layout)} {'are' if len(layout) > 1 else 'is'} the CPU engine's; "
                             "the GPU engine has its own")
        self.engine = make_engine(config, tensors, device, n_ctx=n_ctx or min(config.context_length, 4096),
                                  n_threads=n_threads, kv_type=kv_type, prefill_chunk=prefill_chunk, **layout)
        self.n_ctx = self.engine.n_ctx
        self._sequence = self.engine.new_sequence()
        self._cached: list[int] = []  # the tokens whose keys and values the sequence holds
        self.timings: dict = {}  # of the last generation: prompt/prefill/generated tokens and seconds
        if draft_model is not None and not isinstance(draft_model, LLM):
            draft_model = LLM(draft_model, n_ctx=self.n_ctx, n_threads=n_threads, kv_type=kv_type,
                              prefill_chunk=prefill_chunk, device=device)
        if draft_model is not None:
            check_draft(self, draft_model)
        self.draft = draft_model

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None = None, *, revision: str | None = None,
                        **kwargs) -> LLM:
        """A model from the Hugging Face Hub, as llama-cpp-python's `Llama.from_pretrained`:
        `repo_id` "org/repo"; `filename` the GGUF file, by name or type ("i2_s"), when the repo
        has several; `revision` a branch, tag or commit. Downloaded into the Hub cache once (its
        weights' sha256 checked), loaded from there after, offline too; kwargs go to `LLM`."""
        return cls(hub.fetch(repo_id, filename=filename, revision=revision), **kwargs)

    # ------------------------------------------------------------------------------- tokens

    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """float32 [len(tokens), vocab]: the logits after every token, from position 0."""
        self._check_can_generate()
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        sequence = self.engine.new_sequence(n_ctx=max(1, len(tokens)))
        return self.engine.forward([(sequence, list(tokens))], all_logits=True)[0]

    def perplexity(self, text: str, n_ctx: int | None = None, *, batch_size: int | None = None,
                   progress=None) -> tuple[float, float]:
        """(perplexity, its standard error) of `text`, measured as llama-perplexity does: the
        tokens are cut into windows of n_ctx (default: min(512, the context)), each starting
        with BOS, and only the second half of each window is scored, so every scored token has
        at least n_ctx/2 tokens of context. batch_size: tokens per forward pass (default one
        window). progress(windows_done, windows, ppl_so_far) is called after each batch."""
        self._check_can_generate()
        c = n_ctx or min(512, self.n_ctx)
        if not 4 <= c <= self.config.context_length:
            raise ValueError(f"n_ctx must be between 4 and the model's context "
                             f"{self.config.context_length}, got {c}")
        windows = perplexity_windows(self.tokenize(text), c, self.tokenizer.bos_id)
        per_batch = max(1, (batch_size or c) // c)
        nll = []
        for i in range(0, len(windows), per_batch):
            group = windows[i:i + per_batch]
            outputs = self.engine.forward([(self.engine.new_sequence(n_ctx=c), w) for w in group],
                                          all_logits=True)
            nll.extend(window_nll(logits, w) for logits, w in zip(outputs, group))
            if progress:
                progress(len(nll), len(windows), perplexity_stats(nll)[0])
        return perplexity_stats(nll)

    # --------------------------------------------------------------------------- embeddings

    @property
    def can_generate(self) -> bool:
        """Whether the model can generate text; an embedding model (no LM head) only embeds."""
        return not self.config.embedding_only

    def _check_can_generate(self) -> None:
        if not self.can_generate:
            raise ValueError(embeddings.CANNOT_GENERATE)

    def embedding_tokens(self, text: str) -> list[int]:
        """The tokens a text is embedded from: with the BOS and EOS its tokenizer asks for (the
        BitNet-embedding models pool the hidden state of a closing EOS), control tokens as text."""
        return self.tokenizer.encode(text, special=False)

    def embed(self, texts: str | list[str], *, normalize: bool = True, batch_size: int = 32,
              truncate: bool = True, prompt: str | None = None, prompt_name: str | None = None,
              dimensions: int | None = None, progress=None) -> np.ndarray:
        """Embeddings of `texts`, float32 [len(texts), dim], as sentence-transformers' `encode`:
        a single text gives one vector [dim]. Each is the model's pooling (`config.pooling`: the
        mean of the final hidden states, or the last token's) of its text, cut to its first
        `dimensions` values (default all), then scaled to unit length unless normalize=False.

        prompt: text put before each text (an instruction or a "query: " prefix); prompt_name:
        one of the model's own (`prompts`, from its config_sentence_transformers.json), whose
        `default_prompt_name` applies when neither is given. batch_size:
        texts run together in each forward pass (the longest first, so each batch packs alike;
        the rows come back in the input's order). A text of more tokens than the context keeps
        its first n_ctx with truncate=True; with False it is an error. progress(done, total) is
        called after each batch."""
        single = isinstance(texts, str)
        ids = self._embedding_ids([texts] if single else list(texts), self._prompt(prompt, prompt_name), truncate)
        vectors = self._embed(ids, batch_size=batch_size, normalize=normalize, dimensions=dimensions,
                              progress=progress)
        return vectors[0] if single else vectors

    def create_embedding(self, input: str | list[str], model: str | None = None, *,
                         dimensions: int | None = None, encoding_format: str = "float",
                         prompt: str | None = None, prompt_name: str | None = None) -> dict:
        """OpenAI's embeddings response (llama-cpp-python's name and shape) for a text or texts:
        unit-length vectors (cut to `dimensions` first), as lists of floats or, with
        encoding_format="base64", little-endian float32 bytes in base64; texts too long for the
        context are truncated."""
        embeddings.check_encoding_format(encoding_format)
        ids = self._embedding_ids([input] if isinstance(input, str) else list(input), self._prompt(prompt, prompt_name),
                                  truncate=True)
        vectors = self._embed(ids, dimensions=dimensions)
        return embeddings.openai_response(vectors, model or self.model_name, sum(map(len, ids)), encoding_format)

    def _prompt(self, prompt: str | None, prompt_name: str | None) -> str:
        """The text put before each embedded text: `prompt`, the model's prompt named prompt_name,
        or its default one."""
        if prompt is not None and prompt_name is not None:
            raise ValueError("give prompt or prompt_name, not both")
        if prompt is not None:
            return prompt
        name = self.default_prompt_name if prompt_name is None else prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise ValueError(f"the model has no prompt named {name!r} (it has: {', '.join(self.prompts) or 'none'})")
        return self.prompts[name]

    def _embedding_ids(self, texts: list[str], prompt: str, truncate: bool) -> list[list[int]]:
        """Each text's tokens, `prompt` first, cut to the context (truncate=True) or refused."""
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] is not a string but {type(text).__name__}")
            if not text:
                raise ValueError(f"texts[{i}] is empty")
            ids = self.embedding_tokens(prompt + text)
            if len(ids) > self.n_ctx and not truncate:
                raise ValueError(f"texts[{i}] has {len(ids)} tokens; the context holds {self.n_ctx} "
                                 "(truncate=True keeps the first ones, or load the model with a larger n_ctx)")
            if len(ids) > self.n_ctx:  # cut the text, not a closing EOS
                closing = len(self.tokenizer.encode("", add_bos=False, special=False))
                ids = ids[: self.n_ctx - closing] + ids[len(ids) - closing :]
            out.append(ids)
        return out

    def _embed(self, ids: list[list[int]], *, batch_size: int = 32, normalize: bool = True,
               dimensions: int | None = None, progress=None) -> np.ndarray:
        """`embed` of token lists: the longest first, batch_size of them per forward pass."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        embeddings.check_dimensions(dimensions, self.config.hidden_size)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        vectors = np.zeros((len(ids), self.config.hidden_size), np.float32)
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            vectors[group] = embeddings.embed_tokens(self.engine, [ids[i] for i in group], self.config.pooling)
            if progress:
                progress(len(group) + start, len(order))
        return embeddings.finish(vectors, normalize=normalize, dimensions=dimensions)

    # --------------------------------------------------------------------------- generation

    def stream(self, prompt: str | list[int], *, max_tokens: int = 256, stop: list[str] | None = None,
               speculative: str | None = None, max_guesses: int = 8, ignore_eos: bool = False,
               **sampling) -> Iterator[str]:
        """The completion of `prompt` (text, or token ids), piece by piece as it is generated.

        speculative decoding (`tritlm.speculative`): each step also checks up to `max_guesses`
        guesses of the next tokens, keeping those the model agrees with. "lookup": guesses copied
        from earlier in the prompt and output (fast where the output repeats its input); "draft":
        the draft model's (`draft_model`). The output is the model's own: token for token the same
        when greedy, and with sampling drawn from exactly the same distribution (the speculative
        sampling rule, `sampling.speculative_choice`), though not the same text for a seed as
        plain decoding. `timings` then counts the "proposed_tokens" and "accepted_tokens".

        ignore_eos: end-of-turn tokens don't end the text (for benchmarks: exactly max_tokens)."""
        stream = TextStream(self.tokenizer, max_tokens=max_tokens, stop=stop, stop_ids=set() if ignore_eos else None)
        yield from self._pieces(prompt, stream, SamplingParams(**sampling), speculative, max_guesses)

    def generate(self, prompt: str | list[int], *, max_tokens: int = 256,
                 stop: list[str] | None = None, speculative: str | None = None, max_guesses: int = 8,
                 ignore_eos: bool = False, **sampling) -> str:
        """The completion of `prompt`, whole; arguments as `stream`'s."""
        return "".join(self.stream(prompt, max_tokens=max_tokens, stop=stop, speculative=speculative,
                                   max_guesses=max_guesses, ignore_eos=ignore_eos, **sampling))

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):  # a chat prompt may carry its own BOS already
            bos = self._token_text(self.tokenizer.bos_id)
            return self.tokenize(prompt, add_bos=not (bos and prompt.startswith(bos)), special=True)
        return list(prompt)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        self._check_can_generate()
        ids = self._encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.n_ctx:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx} "
                             "(load the model with a larger n_ctx, or shorten the prompt)")
        return ids

    def _pieces(self, prompt, stream: TextStream, params: SamplingParams, speculative: str | None = None,
                max_guesses: int = 8) -> Iterator[str]:
        proposer = self._proposer(speculative, max_guesses)
        ids = self._prompt_ids(prompt)
        sampler = Sampler(params)
        start = time.perf_counter()
        logits = self._prefill(ids)
        self.timings = {"prompt_tokens": len(ids), "prefill_tokens": self._last_fed,
                        "prefill_seconds": time.perf_counter() - start, "generated_tokens": 0,
                        "decode_seconds": 0.0}
        start = time.perf_counter()
        for token in self._tokens(logits, list(ids), sampler, proposer, stream.max_tokens):
            self.timings["generated_tokens"] += 1
            self.timings["decode_seconds"] = time.perf_counter() - start
            if proposer:
                self.timings |= {"proposed_tokens": proposer.proposed, "accepted_tokens": proposer.accepted}
            text = stream.push(token)
            if text:
                yield text
            if stream.finish_reason:
                return stream
        text = stream.finish("length")  # the context is full
        if text:
            yield text
        return stream

    def _proposer(self, speculative: str | None, max_guesses: int) -> Proposer | None:
        if speculative is None:
            return None
        if isinstance(max_guesses, bool) or not isinstance(max_guesses, int) or max_guesses < 1:
            raise ValueError(f"max_guesses must be a positive integer, got {max_guesses!r}")
        if speculative == "lookup":
            return LookupProposer(k_max=max_guesses)
        if speculative == "draft":
            if self.draft is None:
                raise ValueError("speculative='draft' needs a draft model: LLM(..., draft_model=PATH)")
            return DraftProposer(self.draft.engine, self.draft._sequence, self.draft._cached, k_max=max_guesses)
        raise ValueError(f"speculative must be None, 'lookup' or 'draft', got {speculative!r}")

    def _tokens(self, logits: np.ndarray, context: list[int], sampler: Sampler,
                proposer: Proposer | None, max_tokens: int) -> Iterator[int]:
        """Tokens generated after `context` (whose last token's logits are `logits`) until the
        context is full; `context` grows as they come. With a proposer, each step feeds the last
        token and the proposer's guesses, `speculative.verify` keeps the guesses the sampler
        accepts and chooses one token more; the cache then forgets the guesses rejected."""
        chosen = verify(sampler, [logits], [], context)
        generated = 0
        while True:
            for token in chosen:
                generated += 1
                yield token
            room = self.n_ctx - self._sequence.position - 1  # guesses that fit after the last token
            if room < 0:
                return
            guesses = proposer.propose(context, min(room, max_tokens - generated - 1)) if proposer else []
            rows = self._feed(chosen[-1:] + guesses, all_logits=True)  # [1 + guesses, vocab]
            chosen = verify(sampler, rows, guesses, context)
            if guesses:
                proposer.record(len(guesses), len(chosen) - 1)
                self._rewind(len(guesses) + 1 - len(chosen))

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Logits after `ids`, reusing the longest prefix already in the cache."""
        common = common_prefix(self._cached, ids[:-1])  # at least one token must run, for its logits
        self._sequence.truncate(common)
        del self._cached[common:]
        return self._feed(ids[common:])

    def _feed(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """The logits after the last of `ids` ([vocab]), or after each ([len(ids), vocab])."""
        logits = self.engine.forward([(self._sequence, ids)], all_logits=all_logits)[0]
        self._cached.extend(ids)
        self._last_fed = len(ids)
        return logits if all_logits else logits[-1]

    def _rewind(self, n: int) -> None:
        """Forget the last n tokens fed (rejected guesses)."""
        if n:
            self._sequence.truncate(self._sequence.position - n)
            del self._cached[-n:]

    # ---------------------------------------------------------------- OpenAI-shaped results

    def create_completion(self, prompt: str | list[int], *, max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40,
                          min_p: float = 0.05, repeat_penalty: float = 1.0,
                          presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                          stop: str | list[str] | None = None, seed: int | None = None,
                          stream: bool = False, speculative: str | None = None, max_guesses: int = 8):
        """speculative, max_guesses: as in `stream`."""
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, seed=seed)
        return self._openai(prompt, max_tokens, stop, params, stream, chat=False, speculative=speculative,
                            max_guesses=max_guesses)

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], *, max_tokens: int | None = None,
                               temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, repeat_penalty: float = 1.0,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               stop: str | list[str] | None = None, seed: int | None = None,
                               stream: bool = False, truncate: str | None = None,
                               speculative: str | None = None, max_guesses: int = 8):
        """truncate="oldest": a conversation too long for the context loses its oldest turns
        (system messages stay), leaving room for max_tokens (default a quarter of the context);
        the result's "dropped_messages" says how many went. Without it, too long is an error.
        speculative, max_guesses: as in `stream`."""
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, seed=seed)
        dropped = 0
        if truncate == "oldest":
            messages, dropped = self.fit_chat(messages, max_tokens or self.n_ctx // 4)
        elif truncate is not None:
            raise ValueError(f"truncate must be None or 'oldest', got {truncate!r}")
        result = self._openai(self.chat_prompt(messages), max_tokens, stop, params, stream, chat=True,
                              speculative=speculative, max_guesses=max_guesses)
        if not dropped:
            return result
        if stream:
            return ({"dropped_messages": dropped} | chunk for chunk in result)
        return result | {"dropped_messages": dropped}

    def fit_chat(self, messages: list[dict], reply_tokens: int, n_ctx: int | None = None) -> tuple[list[dict], int]:
        """The conversation without its oldest turns (a turn: a user message and what answers
        it), as few as it takes to leave room for a reply of `reply_tokens` in the context (n_ctx,
        default the model's as loaded); and how many messages went. System messages and the last
        turn always stay."""
        n_ctx = n_ctx or self.n_ctx
        kept = list(messages)
        while len(self._encode(self.chat_prompt(kept))) + reply_tokens > n_ctx:
            first = next((i for i, m in enumerate(kept) if m.get("role") != "system"), len(kept))
            end = next((i for i in range(first + 1, len(kept)) if kept[i].get("role") == "user"), None)
            if end is None:
                raise ValueError(f"the last message and a reply of {reply_tokens} tokens do not fit "
                                 f"the context of {n_ctx} tokens")
            del kept[first:end]
        return kept, len(messages) - len(kept)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt text of a conversation, in the model's chat format."""
        return chat.format_chat(messages, self.tokenizer.chat_template,
                                bos_token=self._token_text(self.tokenizer.bos_id),
                                eos_token=self._token_text(self.tokenizer.eos_id),
                                model_hint=self.config.arch)

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokenizer.token_text(token_id)

    def _openai(self, prompt, max_tokens, stop, params, stream: bool, chat: bool, speculative=None,
                max_guesses=8):
        ids = self._prompt_ids(prompt)
        budget = self.n_ctx - len(ids)
        max_tokens = budget if max_tokens is None or max_tokens <= 0 else min(max_tokens, budget)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_name}
        text_stream = TextStream(self.tokenizer, max_tokens=max_tokens, stop=stop)
        pieces = self._pieces(ids, text_stream, params, speculative, max_guesses)
        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": len(text_stream.tokens),  # noqa: E731
                         "total_tokens": len(ids) + len(text_stream.tokens)}
        if not stream:
            text = "".join(pieces)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                      else {"index": 0, "text": text, "logprobs": None})
            return head | {"object": kind, "choices": [choice | {"finish_reason": text_stream.finish_reason}],
                           "usage": usage()}

        def chunks():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            if chat:
                yield head | {"object": chunk_kind, "choices": [
                    {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            for piece in pieces:
                body = {"delta": {"content": piece}} if chat else {"text": piece, "logprobs": None}
                yield head | {"object": chunk_kind, "choices": [{"index": 0, **body, "finish_reason": None}]}
            last = {"delta": {}} if chat else {"text": "", "logprobs": None}
            yield head | {"object": chunk_kind, "choices": [
                {"index": 0, **last, "finish_reason": text_stream.finish_reason}], "usage": usage()}

        return chunks()


def check_draft(target: LLM, draft: LLM) -> None:
    """A ValueError unless `draft` can propose tokens for `target`: the same vocabulary (its
    size, BOS and EOS, and the bytes of 64 tokens spread over it)."""
    a, b = target.tokenizer, draft.tokenizer
    sizes = [(m.config.vocab_size, m.tokenizer.vocab_size) for m in (target, draft)]
    ids = range(0, a.vocab_size, max(1, a.vocab_size // 64))
    differ = None
    if sizes[0] != sizes[1]:
        differ = f"{sizes[1][1]} tokens, not {sizes[0][1]}" if sizes[0][1] != sizes[1][1] else \
            f"logits for {sizes[1][0]} tokens, not {sizes[0][0]}"
    elif (a.bos_id, a.eos_id) != (b.bos_id, b.eos_id):
        differ = f"BOS / EOS {b.bos_id} / {b.eos_id}, not {a.bos_id} / {a.eos_id}"
    elif (t := next((t for t in ids if a.token_bytes(t) != b.token_bytes(t)), None)) is not None:
        differ = f"token {t} is {b.token_bytes(t)!r}, not {a.token_bytes(t)!r}"
    if differ:
        raise ValueError(f"the draft model's vocabulary is not the model's ({differ}): "
                         "a draft model needs the same tokenizer")


# ----------------------------------------------------------------------- perplexity helpers
# shared with tritlm.train, so the PyTorch model is scored on exactly the same tokens


def perplexity_windows(tokens: list[int], n_ctx: int, bos_id: int | None) -> list[list[int]]:
    """llama-perplexity's windows: consecutive runs of n_ctx tokens, the first replaced by BOS."""
    n = len(tokens) // n_ctx
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens; perplexity needs at least one "
                         f"window of {n_ctx} (give more text or a smaller context)")
    windows = [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(n)]
    if bos_id is not None:
        for w in windows:
            w[0] = bos_id
    return windows


def window_nll(logits: np.ndarray, window: list[int]) -> np.ndarray:
    """Negative log-likelihoods (float64) of the second half of a window: logits [n, vocab] at
    positions n/2 .. n-2 scored against the next tokens."""
    first = len(window) // 2
    x = np.asarray(logits[first:len(window) - 1], dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    targets = np.asarray(window[first + 1:])
    return log_z - x[np.arange(len(targets)), targets]


def perplexity_stats(nll) -> tuple[float, float]:
    """(exp(mean nll), its standard error by the delta method), as llama-perplexity prints."""
    values = np.concatenate([np.atleast_1d(v) for v in nll]).astype(np.float64)
    mean = values.mean()
    err = np.sqrt(max(0.0, (values ** 2).mean() - mean ** 2) / max(1, len(values) - 1))
    ppl = float(np.exp(mean))
    return ppl, float(ppl * err)
