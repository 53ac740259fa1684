"""Choosing the next token from the logits: penalties, then top-k, top-p and min-p filtering on
the unscaled distribution, then temperature (the order llama.cpp uses), then a seeded draw."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # llama.cpp's: divides positive logits of recent tokens (1: off)
    presence_penalty: float = 0.0  # OpenAI's: minus this once for any recent token
    frequency_penalty: float = 0.0  # OpenAI's: minus this per recent occurrence
    repeat_last_n: int = 64  # "recent": the last this many tokens of the context (0: no penalties)
    seed: int | None = None  # same seed, same prompt: same text

    def __post_init__(self):
        checks = [("temperature", self.temperature >= 0), ("top_k", self.top_k >= 0),
                  ("top_p", 0 < self.top_p <= 1), ("min_p", 0 <= self.min_p <= 1),
                  ("repeat_penalty", self.repeat_penalty > 0), ("repeat_last_n", self.repeat_last_n >= 0),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"sampling parameter {name}={getattr(self, name)!r} is out of range")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, context: list[int]) -> int:
        """The next token after `context` (prompt and generated tokens so far)."""
        p = self.params
        logits = self._penalized(np.array(logits, dtype=np.float64), context)
        if p.temperature == 0:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")
        if p.top_k:
            order = order[: p.top_k]
        probs = _softmax(logits[order])
        if p.top_p < 1:  # the smallest prefix whose mass reaches top_p
            order = order[: int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1]
        if p.min_p:
            keep = _softmax(logits[order]) >= p.min_p * _softmax(logits[order])[0]
            order = order[keep]
        probs = _softmax(logits[order] / p.temperature)
        return int(order[self.rng.choice(len(order), p=probs)])

    def _penalized(self, logits: np.ndarray, context: list[int]) -> np.ndarray:
        p = self.params
        recent = Counter(context[-p.repeat_last_n :] if p.repeat_last_n else [])
        for token, count in recent.items():
            if p.repeat_penalty != 1:
                v = logits[token]
                logits[token] = v / p.repeat_penalty if v > 0 else v * p.repeat_penalty
            logits[token] -= p.presence_penalty + p.frequency_penalty * count
        return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
