"""Replays of the NumPy reference with int8 activations that lie on a rounding tie rounded the
other way: what separates two correct float32 pipelines that sum in different orders.

An untrained model keeps nothing off the int8 rounding boundaries, so two implementations of the
same arithmetic can round an activation within an ulp or two of a boundary differently, and that
one activation moves a row by 1e-3 to 2e-2. Tests find every such near-tie (within TIE_ULPS) the
reference meets, replay the reference with each set of up to MAX_FLIPS of them rounded the other
way, and ask another pipeline to equal one of those replays on every row.
"""

import itertools

import numpy as np
import pytest

from tritlm.models import reference
from tritlm.quant import quantize_activations, ternary_matmul

TIE_ULPS = 2  # an activation this close to an int8 rounding boundary may round either way
MAX_FLIPS = 2  # near-ties rounded the other way at once, at most
PROJECTIONS_PER_LAYER = 7


def replay(config, tensors, tokens, flips=(), **forward_options):
    """reference.forward with the activations `flips` names (layer, input, token, element)
    rounded to the other neighbouring integer; and the near-ties it met. An input is the first
    of a layer's linear calls that quantizes it (q, k and v share one where they share a norm)."""
    ties, calls, inputs = [], [0], {}

    def linear(x, weight):
        i = calls[0]
        calls[0] += 1
        layer = i // PROJECTIONS_PER_LAYER
        x = np.ascontiguousarray(x, dtype=np.float32)
        site = (layer, inputs.setdefault((layer, x.tobytes()), i % PROJECTIONS_PER_LAYER))
        q, scale, _ = quantize_activations(x)
        y = x * scale[:, None]  # what was rounded, as quantize_activations computes it
        if site[1] == i % PROJECTIONS_PER_LAYER:  # each input once
            near = np.abs(y - np.floor(y) - np.float32(0.5)) <= TIE_ULPS * np.spacing(np.abs(y))
            ties.extend((*site, int(t), int(e)) for t, e in zip(*np.nonzero(near)))
        for f_layer, f_input, t, e in flips:
            if (f_layer, f_input) == site:
                q[t, e] += 1 if y[t, e] > q[t, e] else -1
        return ternary_matmul(weight.ternary, weight.scale, q, scale, q.sum(axis=1, dtype=np.int32))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "linear", linear)
        out = reference.forward(config, tensors, np.array(tokens), **forward_options)
    return out, ties


def replays(config, tensors, tokens, max_ties: int = 8, **forward_options) -> dict:
    """{flipped near-ties: the reference's output}, for no flip and every set of up to MAX_FLIPS
    of the near-ties the reference meets."""
    plain, ties = replay(config, tensors, tokens, **forward_options)
    assert len(ties) <= max_ties, f"{len(ties)} near-ties, too many to replay"
    return {(): plain} | {flips: replay(config, tensors, tokens, flips, **forward_options)[0]
                          for n in range(1, MAX_FLIPS + 1) for flips in itertools.combinations(ties, n)}


def rows_off(a, b, scale):
    return np.abs(a - b).max(axis=1) / scale


def explain(out, runs: dict, scale: float, tol: float):
    """The near-ties whose flipping makes the reference equal `out` on every row (to tol of
    scale), or None."""
    best = min(runs, key=lambda flips: rows_off(out, runs[flips], scale).max())
    return best if rows_off(out, runs[best], scale).max() <= tol else None
