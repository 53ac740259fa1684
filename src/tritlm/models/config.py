"""What distinguishes one ternary architecture from another, in one record, checked when made."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .arch import Architecture
from .families import BY_GGUF_ARCH


def architecture_of(arch: str) -> Architecture:
    if not isinstance(arch, str) or arch not in BY_GGUF_ARCH:
        raise ValueError(f"unsupported architecture {short(arch)}; supported: {', '.join(BY_GGUF_ARCH)}")
    return BY_GGUF_ARCH[arch]


# The largest size (tokens, width, layers, context, heads x head_dim) a configuration may have:
# far above any model, and small enough that the sizes computed from them stay exact and cheap.
MAX_SIZE = 1 << 24


def short(value) -> str:
    """repr(value), cut short: values in messages come from model files, which can be huge."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a mapping (JSON object)"}


def is_kind(value, kind: type) -> bool:
    """Whether `value` is a `kind` as JSON and GGUF metadata mean it: an int is a number too,
    a bool is neither."""
    if kind in (int, float):
        base = numbers.Integral if kind is int else numbers.Real
        return isinstance(value, base) and not isinstance(value, bool)
    return isinstance(value, kind)


def checked(value, kind: type, what: str):
    """`value` if it is a `kind` (int, float, str, bool, list or dict), else a ValueError that
    names `what` (the file and the key). Numbers come back as plain int / float."""
    if not is_kind(value, kind):
        raise ValueError(f"{what} must be {_KIND_NAMES[kind]}, not {type(value).__name__} {short(value)}")
    return float(value) if kind is float else int(value) if kind is int else value


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
         "context_length", "head_dim")


class ConfigError(ValueError):
    """A ModelConfig field of the wrong type or out of range. `field`, `value` and `problem` let a
    loader name the field as its own file spells it."""

    def __init__(self, field: str, value, problem: str):
        super().__init__(f"{field} = {short(value)}: {problem}")
        self.field, self.value, self.problem = field, value, problem


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a GGUF architecture name (families.BY_GGUF_ARCH)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    context_length: int
    rope_theta: float
    norm_eps: float
    head_dim: int = 0  # 0: hidden_size // n_heads
    # RoPE pairs (i, i + head_dim/2) ("neox", HF's rotate_half) or (2i, 2i + 1) ("norm", GGUF llama)
    rope_style: str = "neox"
    tied_embeddings: bool = True
    # how an embedding is pooled from the final hidden states: "mean" over the tokens, or the
    # "last" token's (the BitNet embedding models)
    pooling: str = "mean"
    embedding_only: bool = False  # a text-embedding model: its files carry no LM head to generate with
    attention_scale: float = 0.0  # q . k is scaled by this; 0: 1 / sqrt(head_dim)
    sliding_window: int = 0  # keys a sliding layer's query sees (itself and the window - 1 before)
    sliding_layers: tuple[int, ...] = ()  # the layers that attend to a sliding window
    rope_theta_sliding: float = 0.0  # RoPE theta of the sliding layers; 0: rope_theta

    def __post_init__(self):
        architecture_of(self.arch)
        # every size is checked before anything is sized by it
        for name in SIZES:
            self._size(name, lowest=0 if name == "head_dim" else 1)
        if not self.head_dim:
            self._set("head_dim", self.hidden_size // self.n_heads)
            if not self.head_dim:
                raise ConfigError("n_heads", self.n_heads, f"more heads than hidden_size {self.hidden_size}")
        if self.head_dim % 2:
            raise ConfigError("head_dim", self.head_dim, "must be even (RoPE rotates pairs)")
        if self.n_heads * self.head_dim > MAX_SIZE:
            raise ConfigError("n_heads", self.n_heads, f"times head_dim {self.head_dim} is over {MAX_SIZE}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("n_kv_heads", self.n_kv_heads,
                              f"{self.n_heads} query heads do not group over {self.n_kv_heads} KV heads")
        # RoPE frequencies are theta^(-2i/d): theta <= 1 would make them grow, not fall
        self._number("rope_theta", lambda x: x > 1, "must be a finite number above 1")
        self._number("norm_eps", lambda x: 0 <= x < 1, "must be a finite number in [0, 1)")
        if self.rope_style not in ("neox", "norm"):
            raise ConfigError("rope_style", self.rope_style, "must be 'neox' or 'norm'")
        if self.pooling not in ("mean", "last"):
            raise ConfigError("pooling", self.pooling, "must be 'mean' or 'last'")
        for name in ("tied_embeddings", "embedding_only"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "must be true or false")
        self._number("attention_scale", lambda x: x >= 0, "must be a finite number >= 0")
        if not self.attention_scale:
            self._set("attention_scale", 1 / math.sqrt(self.head_dim))
        self._size("sliding_window", lowest=0)
        layers = tuple(self.sliding_layers)
        if not all(is_kind(i, int) and 0 <= i < self.n_layers for i in layers) or len(set(layers)) != len(layers):
            raise ConfigError("sliding_layers", self.sliding_layers, f"must be distinct layers of 0..{self.n_layers - 1}")
        if layers and not self.sliding_window:
            raise ConfigError("sliding_window", self.sliding_window, "must be positive where layers slide")
        self._set("sliding_layers", tuple(sorted(int(i) for i in layers)))
        if not self.rope_theta_sliding:
            self._set("rope_theta_sliding", self.rope_theta)
        self._number("rope_theta_sliding", lambda x: x > 1, "must be a finite number above 1")

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    def _size(self, name: str, lowest: int) -> None:
        value = getattr(self, name)
        if not is_kind(value, int) or not lowest <= value <= MAX_SIZE:
            raise ConfigError(name, value, f"must be an integer from {lowest} to {MAX_SIZE}")
        self._set(name, int(value))

    def _number(self, name: str, in_range, problem: str) -> None:
        value = getattr(self, name)
        try:
            x = float(value) if is_kind(value, float) else math.nan
        except OverflowError:  # an int beyond float's range
            x = math.inf
        if not math.isfinite(x) or not in_range(x):
            raise ConfigError(name, value, problem)
        self._set(name, x)

    @property
    def architecture(self) -> Architecture:
        return architecture_of(self.arch)

    @property
    def family(self) -> str:
        return self.architecture.family

    @property
    def activation(self) -> str:
        return self.architecture.activation

    def window(self, layer: int) -> int:
        """Keys a query of `layer` sees at most (0: all before it)."""
        return self.sliding_window if layer in self.sliding_layers else 0

    def theta(self, layer: int) -> float:
        return self.rope_theta_sliding if layer in self.sliding_layers else self.rope_theta
