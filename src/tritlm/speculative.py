"""Guesses of the next tokens for speculative decoding, to be verified by the model in one step.

A step feeds the last token and k guesses, and gets the model's logits after each (one pass over
the weights, which costs little more than one token's); `verify` keeps the guesses the model's
sampler agrees with (exactly: the output is distributed as plain decoding's, token for token the
same when greedy), the cache then forgets the rest.

- `LookupProposer` is prompt lookup (n-gram matching): output often repeats its input (code
  edits, quotes, lists), so the tokens that followed the last occurrence of the current n-gram
  are a good guess of what follows now. No second model, no memory beyond an index of n-grams.
- `DraftProposer` asks a smaller model with the same tokenizer (its greedy continuation).

Both adapt k to how their guesses fare (`Proposer`), so a bad guesser costs almost nothing.
"""

from __future__ import annotations

import numpy as np

from .sampling import Sampler


def verify(sampler: Sampler, rows: np.ndarray, guesses: list[int], context: list[int]) -> list[int]:
    """The tokens chosen after `context`, given the logits `rows` after its last token and after
    each guess: the guesses accepted (`Sampler.verify`), then one more, drawn from the residual
    distribution after the first rejected guess or, when all were accepted, from the row after the
    last (the bonus token). Without guesses: one token sampled plainly from rows[0]. `context`
    grows by the tokens chosen, so each position's penalties see the guesses accepted before it."""
    n = len(context)
    for row, guess in zip(rows, guesses):
        token = sampler.verify(row, context, guess)
        context.append(token)
        if token != guess:
            return context[n:]
    context.append(sampler(rows[len(guesses)], context))
    return context[n:]


class Proposer:
    """Proposes up to k guesses per step (`propose`); k adapts to how they fare (`record`): it
    doubles, up to k_max, when all of them were accepted, and becomes one more than the number
    accepted when one was rejected. When even a single guess is rejected, proposing pauses for 1,
    2, 4 ... up to 32 steps (back to 1 after any acceptance), so a bad guesser costs almost nothing.

    One proposer per generation: the context it is given only grows."""

    def __init__(self, *, k: int = 4, k_max: int = 8):
        if k < 1 or k_max < 1:
            raise ValueError(f"k and k_max must be at least 1, got {k}, {k_max}")
        self.k, self.k_max = min(k, k_max), k_max  # k: the first step's
        self.proposed = self.accepted = 0  # totals, for statistics
        self._pause, self._backoff = 0, 1

    def propose(self, context: list[int], limit: int | None = None) -> list[int]:
        """Up to min(k, limit) guesses of the tokens after `context` (prompt and output so far)."""
        k = self.wanted(limit)
        return self._guess(context, k) if k else []

    def wanted(self, limit: int | None = None) -> int:
        """How many guesses to make this step: min(k, limit), or 0 while pausing (this step then
        counts as paused)."""
        if self._pause:
            self._pause -= 1
            return 0
        return max(0, self.k if limit is None else min(self.k, limit))

    def _guess(self, context: list[int], k: int) -> list[int]:
        raise NotImplementedError

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


class LookupProposer(Proposer):
    """Proposes the tokens that followed the most recent earlier occurrence of the context's last
    `max_ngram` tokens, else of its last max_ngram - 1, ... down to `min_ngram` (longest first: a
    longer match is a better predictor). When fewer than k tokens follow the match, the text is
    repeating itself with the period from there to now, and the guesses go on with that period.
    Nothing when no n-gram matches, so text that never repeats costs no verification."""

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1, k: int = 4, k_max: int = 8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        super().__init__(k=k, k_max=k_max)
        self.ngrams = range(max_ngram, min_ngram - 1, -1)
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its last occurrence is
        self._indexed = 0  # context positions whose preceding n-grams are in _next

    def _guess(self, context: list[int], k: int) -> list[int]:
        for end in range(self._indexed, len(context)):  # index the n-grams that now have a successor
            for n in self.ngrams:
                if end >= n:
                    self._next[tuple(context[end - n : end])] = end
        self._indexed = max(self._indexed, len(context))
        for n in self.ngrams:
            if len(context) >= n and (at := self._next.get(tuple(context[-n:]))) is not None:
                # copied as LZ77 copies: a match that runs into the present repeats with its period
                guesses = context[at : at + k]
                while len(guesses) < k:
                    guesses.append(guesses[len(guesses) - (len(context) - at)])
                return guesses
        return []


class DraftProposer(Proposer):
    """Proposes the greedy continuation of a draft model (a smaller model with the target's
    tokenizer), run by its own `engine` in a `sequence` of its own whose tokens are `cached` (an
    LLM's, or a server slot's: the list is kept up to date in place). Before each proposal the
    sequence is rewound to the longest start of the context it holds (dropping the guesses the
    target rejected, as the target's cache does) and fed the rest."""

    def __init__(self, engine, sequence, cached: list[int], *, k: int = 4, k_max: int = 8):
        super().__init__(k=k, k_max=k_max)
        self.engine, self.sequence, self.cached = engine, sequence, cached

    def _guess(self, context: list[int], k: int) -> list[int]:
        return draft_guesses([(self, context, k)])[0]

    def _rewind(self, context: list[int]) -> list[int]:
        """Rewinds the sequence to the longest start of `context` it holds; the tokens to feed."""
        common = common_prefix(self.cached, context[:-1])  # at least one token must run, for its logits
        self.sequence.truncate(common)
        del self.cached[common:]
        return context[common:]


def draft_guesses(requests: list[tuple[DraftProposer, list[int], int]]) -> list[list[int]]:
    """The guesses of draft proposers (proposer, context, k), made in lockstep: each draft step is
    one forward pass for every proposer of an engine, so a server's draft model reads its weights
    once per step for all its requests, not once per request."""
    proposers = [p for p, _, _ in requests]
    wanted = [min(k, p.sequence.n_ctx - len(context)) for p, context, k in requests]  # the cache must hold them
    fed = [p._rewind(context) if k > 0 else [] for (p, context, _), k in zip(requests, wanted)]
    guesses: list[list[int]] = [[] for _ in requests]
    while active := [i for i in range(len(requests)) if len(guesses[i]) < wanted[i]]:
        for engine in {id(proposers[i].engine): proposers[i].engine for i in active}.values():
            group = [i for i in active if proposers[i].engine is engine]
            rows = engine.forward([(proposers[i].sequence, fed[i]) for i in group])
            for i, logits in zip(group, rows):
                proposers[i].cached.extend(fed[i])
                guesses[i].append(int(np.argmax(logits[-1])))
                fed[i] = guesses[i][-1:]
    return guesses


def propose_all(requests: list[tuple[Proposer, list[int], int | None]]) -> list[list[int]]:
    """Each proposer's guesses after its context (up to its limit), as `Proposer.propose` makes
    them, the draft models' in shared steps (`draft_guesses`)."""
    wanted = [p.wanted(limit) for p, _, limit in requests]
    guesses: list[list[int]] = [[] for _ in requests]
    drafts = []
    for i, ((p, context, _), k) in enumerate(zip(requests, wanted)):
        if k and isinstance(p, DraftProposer):
            drafts.append(i)
        elif k:
            guesses[i] = p._guess(context, k)
    for i, g in zip(drafts, draft_guesses([(requests[i][0], requests[i][1], wanted[i]) for i in drafts])):
        guesses[i] = g
    return guesses


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens a and b start with alike."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
