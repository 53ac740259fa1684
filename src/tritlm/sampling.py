"""Choosing the next token from the logits: penalties, then top-k, top-p and min-p filtering on
the unscaled distribution, then temperature (the order llama.cpp uses), then a seeded draw."""

from __future__ import annotations

import math
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
    seed: int | None = None  # any integer (taken modulo 2**64); same seed, same prompt: same text

    def __post_init__(self):
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"sampling parameter seed={self.seed!r} is not an integer")
        # comparisons are False for NaN; infinities are refused explicitly
        checks = [("temperature", 0 <= self.temperature < math.inf), ("top_k", self.top_k >= 0),
                  ("top_p", 0 < self.top_p <= 1), ("min_p", 0 <= self.min_p <= 1),
                  ("repeat_penalty", 0 < self.repeat_penalty < math.inf), ("repeat_last_n", self.repeat_last_n >= 0),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"sampling parameter {name}={getattr(self, name)!r} is out of range")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        # numpy takes seeds >= 0 only; OpenAI's are any integer
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)

    def __call__(self, logits: np.ndarray, context: list[int]) -> int:
        """The next token after `context` (prompt and generated tokens so far)."""
        tokens, probs = self.distribution(logits, context)
        if self.params.temperature == 0:
            return int(tokens[0])
        return int(tokens[self.rng.choice(len(tokens), p=probs)])

    def verify(self, logits: np.ndarray, context: list[int], guess: int) -> int:
        """The next token after `context`, given a proposer's guess of it (speculative decoding;
        the proposer deterministic, so its distribution q is one-hot at `guess`): `guess` when
        accepted, else another token. Distributed exactly as `__call__`'s token; greedy, it is
        the same token."""
        tokens, probs = self.distribution(logits, context)
        if self.params.temperature == 0:
            return int(tokens[0])
        p = np.zeros(len(logits))
        p[tokens] = probs
        return speculative_choice(p, None, guess, self.rng)

    def distribution(self, logits: np.ndarray, context: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, probabilities): what the next token after `context` is drawn from, the tokens
        that survive penalties, top-k, min-p and top-p, with their probabilities at the
        temperature. Greedy (temperature 0): the best token alone."""
        p = self.params
        logits = self._penalized(np.array(logits, dtype=np.float64), context)
        if p.temperature == 0:
            return np.array([np.argmax(logits)]), np.ones(1)
        # No full sort of the vocabulary (12 ms for 128k tokens, per token of every stream):
        # top-k takes a partial one, min-p a threshold, and top-p sorts only what survives them.
        keep = _best(logits, p.top_k) if p.top_k else np.arange(len(logits))
        probs = _softmax(logits[keep])
        if p.min_p:  # relative to the best token, so it commutes with top-p's cut
            kept = probs >= p.min_p * probs.max()
            keep, probs = keep[kept], probs[kept]
        if p.top_p < 1:
            keep = keep[_nucleus(probs, p.top_p)]
        return keep, _softmax(logits[keep], p.temperature)

    def _penalized(self, logits: np.ndarray, context: list[int]) -> np.ndarray:
        p = self.params
        recent = Counter(context[-p.repeat_last_n :] if p.repeat_last_n else [])
        for token, count in recent.items():
            if p.repeat_penalty != 1:
                v = logits[token]
                logits[token] = v / p.repeat_penalty if v > 0 else v * p.repeat_penalty
            logits[token] -= p.presence_penalty + p.frequency_penalty * count
        return logits


def speculative_choice(p: np.ndarray, q: np.ndarray | None, guess: int, rng: np.random.Generator) -> int:
    """Speculative sampling's acceptance rule: Leviathan, Kalman and Matias, "Fast inference
    from transformers via speculative decoding" (ICML 2023), Algorithm 1; Chen et al.,
    "Accelerating large language model decoding with speculative sampling" (2023).

    p: the target model's distribution of the next token, as plain sampling draws it; q: the
    proposer's, from which `guess` was drawn (None: a deterministic proposer, q one-hot at
    `guess`). Returns `guess` with probability min(1, p(guess) / q(guess)): accepted; otherwise
    a token drawn from the residual distribution normalize(max(0, p - q)), which is never `guess`
    (a rejected guess has p(guess) < q(guess)). The token returned is distributed as p exactly:
    P(t) = q(t) min(1, p(t)/q(t)) + residual(t) sum_x q(x) (1 - min(1, p(x)/q(x)))
         = min(q(t), p(t)) + max(0, p(t) - q(t)) = p(t).
    When every guess of a step is accepted, the next token (the bonus) is drawn from p as usual.
    """
    if q is None:
        q = np.zeros(len(p))
        q[guess] = 1.0
    if rng.random() < p[guess] / q[guess]:
        return guess
    residual = np.maximum(p - q, 0.0)
    support = np.flatnonzero(residual)
    return int(support[rng.choice(len(support), p=residual[support] / residual[support].sum())])


def _best(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first, ties in index order: the first k of a
    stable descending sort, from a partition."""
    n = len(values)
    if k >= n:
        return np.argsort(-values, kind="stable")
    kth = np.partition(values, n - k)[n - k]
    above = np.flatnonzero(values > kth)
    chosen = np.concatenate([above, np.flatnonzero(values == kth)[: k - len(above)]])
    return chosen[np.argsort(-values[chosen], kind="stable")]


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the most likely probs, most likely first, up to the first whose cumulative
    mass reaches top_p (searched among the best 256, then 4096, then all)."""
    k = 256
    while True:
        best = _best(probs, k)
        mass = np.cumsum(probs[best])
        if mass[-1] >= top_p or k >= len(probs):
            return best[: int(np.searchsorted(mass, top_p)) + 1]
        k = k * 16 if k * 16 < len(probs) // 4 else len(probs)


def _softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    # shifted before the division: the best logit gives exp(0) = 1 at any temperature, and where
    # a tiny one overflows the others to -inf they get exp(-inf) = 0, never a NaN
    with np.errstate(over="ignore"):
        e = np.exp((x - x.max()) / temperature)
    return e / e.sum()
