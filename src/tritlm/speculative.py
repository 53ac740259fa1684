"""Guesses of the next tokens for speculative decoding, to be verified by the model in one step.

`LookupProposer` is prompt lookup (n-gram matching): output often repeats its input (code
edits, quotes, lists), so the tokens that followed the last occurrence of the current n-gram
are a good guess of what follows now. No second model, no memory beyond an index of n-grams.
"""

from __future__ import annotations


class LookupProposer:
    """Proposes up to k tokens: those that followed the most recent earlier occurrence of the
    context's last `max_ngram` tokens, else of its last max_ngram - 1, ... down to `min_ngram`
    (longest first: a longer match is a better predictor). Nothing when no n-gram matches, so
    text that never repeats costs no verification.

    k adapts to how the guesses fare (`record`): it doubles, up to k_max, when all of them were
    accepted, and becomes one more than the number accepted when one was rejected. When even a
    single guess is rejected, proposing pauses for 1, 2, 4 ... up to 32 steps (back to 1 after any
    acceptance), so a bad guesser costs almost nothing.

    One proposer per generation: the context it is given only grows (what it has indexed stays).
    """

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1, k: int = 4, k_max: int = 8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if not 1 <= k <= k_max:
            raise ValueError(f"need 1 <= k <= k_max, got {k}, {k_max}")
        self.ngrams = range(max_ngram, min_ngram - 1, -1)
        self.k, self.k_max = k, k_max
        self.proposed = self.accepted = 0  # totals, for statistics
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its last occurrence is
        self._indexed = 0  # context positions whose preceding n-grams are in _next
        self._pause, self._backoff = 0, 1

    def propose(self, context: list[int], limit: int | None = None) -> list[int]:
        """Up to min(k, limit) guesses of the tokens after `context` (prompt and output so far)."""
        for end in range(self._indexed, len(context)):  # index the n-grams that now have a successor
            for n in self.ngrams:
                if end >= n:
                    self._next[tuple(context[end - n : end])] = end
        self._indexed = max(self._indexed, len(context))
        k = self.k if limit is None else min(self.k, limit)
        if self._pause:
            self._pause -= 1
            return []
        if k <= 0:
            return []
        for n in self.ngrams:
            if len(context) >= n and (at := self._next.get(tuple(context[-n:]))) is not None:
                return context[at : at + k]
        return []

    def record(self, proposed: int, accepted: int) -> None:
        """How many of the last guesses the model accepted (the first `accepted` of `proposed`)."""
        if not proposed:
            return
        self.proposed += proposed
        self.accepted += accepted
        if accepted == proposed:
            self.k = min(self.k_max, 2 * self.k)
        else:
            self.k = accepted + 1
        if accepted:
            self._backoff = 1
        elif proposed == 1:
            self._pause, self._backoff = self._backoff, min(32, 2 * self._backoff)
