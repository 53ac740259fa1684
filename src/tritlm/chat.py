"""Chat prompts: the built-in BitNet b1.58 2B4T format, or the model's Jinja template rendered in
a sandbox the way transformers' `apply_chat_template` renders it.

The returned string carries its own BOS when the format has one: encode it with
``tokenizer.encode(prompt, add_bos=False)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

__all__ = ["format_chat", "format_bitnet_2b4t", "recognise_bitnet_2b4t", "ChatTemplateError",
           "ROLES", "BITNET_2B4T_ARCHS"]

ROLES = ("system", "user", "assistant", "tool")
# GGUF architectures (bitnet.cpp), and the HF class, of BitNet b1.58 2B4T. Not plain "bitnet":
# that GGUF arch is 1bitLLM's models, and their HF class is "BitnetForCausalLM".
BITNET_2B4T_ARCHS = frozenset({"bitnet-b1.58", "bitnet-25", "BitNetForCausalLM"})
_2B4T_VOCAB = 128256


class ChatTemplateError(ValueError):
    """The chat template failed: syntax, raise_exception(), or a blocked (unsafe) operation."""


def recognise_bitnet_2b4t(model_hint: str = "", template: str | None = None, *,
                          vocab_size: int | None = None, has_eot_id: bool = False) -> bool:
    """Whether to use the built-in 2B4T format rather than the file's template (whose template is
    missing or wrong). The rule:

    - `model_hint` is a 2B4T architecture (GGUF ``bitnet-b1.58`` / ``bitnet-25``, HF
      ``BitNetForCausalLM``) or a name containing ``bitnet-b1.58-2b`` (e.g. the HF repo id): yes;
    - another non-empty hint: no — the caller knows the architecture;
    - no hint: yes only for a 2B4T-shaped vocabulary (128256 tokens with <|eot_id|>) that has no
      template, since a Llama-3 vocabulary with a template of its own is a Llama-3 model.
    """
    hint = model_hint.strip()
    if hint in BITNET_2B4T_ARCHS or "bitnet-b1.58-2b" in hint.lower():
        return True
    if hint:
        return False
    return template is None and vocab_size == _2B4T_VOCAB and has_eot_id


def validate_messages(messages) -> list[dict]:
    """Plain-dict copies of `messages`, or a ValueError that says which one is wrong."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, not {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLES)}; "
                             f"got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}): content must be a str, "
                             f"not {type(content).__name__}")
        out.append(dict(m))
    return out


def format_bitnet_2b4t(messages: list[dict], *, add_generation_prompt: bool = True,
                       bos_token: str = "<|begin_of_text|>") -> str:
    """BitNet b1.58 2B4T: BOS, then ``Role: content<|eot_id|>`` per message (System / User /
    Assistant), then ``Assistant: `` to generate."""
    parts = [bos_token]
    for i, m in enumerate(validate_messages(messages)):
        if m["role"] == "tool":
            raise ValueError(f"messages[{i}]: the BitNet 2B4T chat format has no tool role")
        parts.append(f"{m['role'].capitalize()}: {m['content']}<|eot_id|>")
    if add_generation_prompt:
        parts.append("Assistant: ")
    return "".join(parts)


def format_chat(messages: list[dict], template: str | None, *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True, model_hint: str = "",
                **template_vars) -> str:
    """The prompt for `messages`. 2B4T (see `recognise_bitnet_2b4t`) gets the built-in format;
    any other model its own Jinja `template`, rendered with messages, add_generation_prompt,
    bos_token, eos_token, raise_exception and `template_vars` (e.g. tools=...)."""
    if recognise_bitnet_2b4t(model_hint, template):
        return format_bitnet_2b4t(messages, add_generation_prompt=add_generation_prompt,
                                  bos_token=bos_token or "<|begin_of_text|>")
    if template is None:
        raise ValueError("this model has no chat template and no built-in chat format; "
                         "pass a template, or prompt it with plain text")
    if not isinstance(template, str):
        raise ValueError(f"a chat template is a str, not {type(template).__name__}")
    msgs = validate_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **template_vars)
    except ChatTemplateError:
        raise
    except (TemplateError, SecurityError) as e:  # SecurityError is a TemplateError; be explicit
        raise ChatTemplateError(f"chat template failed: {e}") from e


# ----------------------------------------------------------------------------- Jinja sandbox


class _Sandbox(ImmutableSandboxedEnvironment):
    # Jinja's sandbox answers an unsafe attribute (``x.__class__``) with an Undefined that only
    # fails when used further, and prints as ""; refuse at once instead
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a "
                            f"{type(obj).__name__} is not allowed in a chat template")


class _GenerationTag(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` marks assistant text for
    training masks; for a prompt it is just its body."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body)


def _raise_exception(message):
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # templates expect json.dumps as transformers offers it, not Jinja's HTML-escaping tojson
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(template: str):
    # the settings transformers renders templates with, so that whitespace comes out the same
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e
