"""One request's generated tokens turned into text, and the reasons to stop.

`TextStream` is per request, so the same logic serves one stream in `tritlm.LLM` and many
requests batched by the server."""

from __future__ import annotations

from .tokenizer import IncrementalDecoder, Tokenizer


class TextStream:
    """Feeds on generated tokens; returns the text each one completes. Never emits half a UTF-8
    character, nor text that may be the start of a stop string; ends on an end-of-turn token,
    a stop string (not included in the text) or `max_tokens`."""

    def __init__(self, tokenizer: Tokenizer, *, max_tokens: int, stop: list[str] | None = None,
                 stop_ids: set[int] | None = None):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        # a continuation keeps its first space (SentencePiece decoding would strip it)
        self.decoder = IncrementalDecoder(tokenizer, skip_special=True, strip_leading_space=False)
        self.stop = stop
        self.stop_ids = set(tokenizer.eot_ids if stop_ids is None else stop_ids)
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.text = ""  # everything emitted so far
        self._held = ""  # decoded, not yet emitted: might begin a stop string
        self.finish_reason: str | None = None  # "stop" or "length"

    def push(self, token: int) -> str:
        if self.finish_reason:
            raise ValueError("the stream has finished")
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._emit(self._held + self.decoder.flush())
        pending = self._held + self.decoder.push(token)
        for s in self.stop:
            at = pending.find(s)
            if at >= 0:
                self.finish_reason = "stop"
                self._held = ""
                return self._emit(pending[:at])
        if len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
            return self._emit(pending + self.decoder.flush())
        keep = max((_overlap(pending, s) for s in self.stop), default=0)
        self._held = pending[len(pending) - keep :] if keep else ""
        return self._emit(pending[: len(pending) - keep])

    def finish(self, reason: str) -> str:
        """End early (the context is full, the client left...): the text still held back."""
        self.finish_reason = reason
        text, self._held = self._held + self.decoder.flush(), ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        self.text += text
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
