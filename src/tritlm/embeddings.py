"""Embeddings: a text's final hidden states (what `Engine.forward_hidden` returns, after the
output norm) pooled into one vector as the model says (`ModelConfig.pooling`: the "mean" of every
token's, or the "last" token's), then cut to its first `dimensions` values (Matryoshka style) and
L2-normalised. `LLM.embed`, the server's /v1/embeddings and `tritlm embed` all go through these
functions."""

from __future__ import annotations

import base64

import numpy as np

# what a model without an LM head answers when asked to generate
CANNOT_GENERATE = "this model makes embeddings; it cannot generate text"


def all_rows(pooling: str) -> bool:
    """Whether `pooling` reads every token's hidden state ("mean"), or only the last one's."""
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    return pooling == "mean"


def pool(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """One text's embedding, not normalised, float32 [hidden], from its final hidden states
    [tokens, hidden] (for "last" pooling the last row alone will do)."""
    if all_rows(pooling):
        return hidden.mean(axis=0, dtype=np.float64).astype(np.float32)
    return np.array(hidden[-1], dtype=np.float32)


def embed_tokens(engine, token_lists: list[list[int]], pooling: str) -> np.ndarray:
    """The pooled embeddings, not normalised, float32 [len(token_lists), hidden], of token lists
    run together: stacked into the same steps, each in a sequence of its own."""
    batch = [(engine.new_sequence(len(ids)), ids) for ids in token_lists]
    hidden = engine.forward_hidden(batch, all_rows(pooling))
    return np.stack([pool(h, pooling) for h in hidden]).reshape(len(token_lists), -1)


def check_dimensions(dimensions: int | None, hidden: int) -> None:
    if dimensions is not None and not (isinstance(dimensions, int) and 1 <= dimensions <= hidden):
        raise ValueError(f"dimensions must be between 1 and the model's {hidden}, got {dimensions!r}")


def finish(vectors: np.ndarray, *, normalize: bool = True, dimensions: int | None = None) -> np.ndarray:
    """Pooled embeddings [n, hidden] cut to their first `dimensions` values (None: all), then
    with normalize scaled to unit L2 norm: float32 [n, dimensions]."""
    check_dimensions(dimensions, vectors.shape[1])
    vectors = np.asarray(vectors[:, :dimensions], dtype=np.float64)
    if normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors.astype(np.float32)


def check_encoding_format(encoding_format: str) -> None:
    if encoding_format not in ("float", "base64"):
        raise ValueError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}")


def openai_response(vectors: np.ndarray, model: str, prompt_tokens: int,
                    encoding_format: str = "float") -> dict:
    """OpenAI's embeddings response (llama-cpp-python's `create_embedding` shape): each vector a
    list of floats, or with "base64" its little-endian float32 bytes in base64."""
    check_encoding_format(encoding_format)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
             if encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
