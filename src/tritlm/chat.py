"""Chat prompts: the built-in BitNet b1.58 2B4T format, or the model's Jinja template rendered in
a sandbox the way transformers' `apply_chat_template` renders it.

The returned string carries its own BOS when the format has one: encode it with
``tokenizer.encode(prompt, add_bos=False)``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from string import Formatter

from jinja2 import nodes, pass_context
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

__all__ = ["format_chat", "format_bitnet_2b4t", "recognise_bitnet_2b4t", "ChatTemplateError",
           "ROLES", "BITNET_2B4T_ARCHS"]

ROLES = ("system", "user", "assistant", "tool")
# GGUF architectures (bitnet.cpp), and the HF class, of BitNet b1.58 2B4T. Not plain "bitnet":
# that GGUF arch is 1bitLLM's models, and their HF class is "BitnetForCausalLM".
BITNET_2B4T_ARCHS = frozenset({"bitnet-b1.58", "bitnet-25", "BitNetForCausalLM"})
_2B4T_VOCAB = 128256


class ChatTemplateError(ValueError):
    """The chat template failed: syntax, raise_exception(), a blocked (unsafe) operation, or
    the limits of the sandbox (MAX_STEPS, MAX_SECONDS, MAX_CHARS)."""


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
    budget = _budget.set(_Budget())
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **template_vars)
    except ChatTemplateError:
        raise
    except Exception as e:  # whatever the template did: TemplateError, TypeError, RecursionError, ...
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _budget.reset(budget)


# ----------------------------------------------------------------------------- Jinja sandbox
# A template comes from a model file, so rendering one is bounded: no attribute outside the
# sandbox, no other template (include, import, extends), and a budget of steps, seconds and
# characters that every loop pass, call, filter, operator and printed value is counted against.
# Operations whose result can outgrow their inputs ('x' * n, '{:>n}'.format, center(n), replace,
# join, indent, ...) are checked before they run, everything else after.

MAX_STEPS = 1_000_000  # loop passes, macro calls, calls, filters, operators
MAX_SECONDS = 5.0
MAX_CHARS = 1 << 27  # characters of the strings made, and items of the lists and dicts made
MAX_INT_BITS = 1 << 16  # of an integer made by * or **


class _Budget:
    """What one rendering has spent."""

    def __init__(self):
        self.steps, self.chars = 0, 0
        self.deadline = time.monotonic() + MAX_SECONDS
        self.weights: dict[int, tuple[object, int]] = {}  # id -> (container, its weight)

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ChatTemplateError(f"chat template: more than {MAX_STEPS} steps (loop passes, "
                                    "calls, filters, operators)")
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template: rendering took more than {MAX_SECONDS:g} s")

    def spend(self, chars: int) -> None:
        """Counts `chars` characters (or items) made, or about to be."""
        self.chars += chars
        if self.chars > MAX_CHARS:
            raise ChatTemplateError(f"chat template: makes more than {MAX_CHARS} characters")

    def made(self, value):
        """`value`, counted: strings by length, lists, tuples and dicts by their items, nested."""
        self.spend(self.weight(value))
        return value

    def weight(self, value) -> int:
        if isinstance(value, str):
            return len(value)
        if not isinstance(value, (list, tuple, dict)):
            return 1  # (a namespace too: _Namespace keeps what it holds out of sight)
        # each container is weighed once (the sandbox keeps it from changing), so a structure
        # that holds the same list twice at every level weighs 2^depth after depth steps
        known = self.weights.get(id(value))
        if known is None:
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            known = self.weights[id(value)] = (value, len(value) + sum(map(self.weight, items)))
        return known[1]


_budget: ContextVar[_Budget] = ContextVar("chat template budget")


def _int(value) -> int:
    return value if isinstance(value, int) else 0  # (anything else fails in the call itself)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return kwargs.get(name, args[i] if len(args) > i else default)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*([*\d]*)(?:\.([*\d]*))?")


def _format_size(fmt, percent: bool) -> int:
    """A bound on the padding and precision a format string asks for (% or str.format style)."""
    if not isinstance(fmt, str):
        return 0
    if percent:
        specs = [m.group(1) + "." + (m.group(2) or "") for m in _PERCENT_SPEC.finditer(fmt)]
    else:
        specs = [spec or "" for _, _, spec, _ in Formatter().parse(fmt)]
    if any("*" in spec or "{" in spec for spec in specs):
        raise ChatTemplateError("chat template: widths taken from arguments are not supported")
    return len(fmt) + sum(int(n) for spec in specs for n in re.findall(r"\d+", spec))


def _growth(name: str, value, args: tuple, kwargs: dict) -> int:
    """A bound on the size of `value.name(*args, **kwargs)` (a str method) or of
    `value | name(*args, **kwargs)` (a filter), for those whose result can outgrow their inputs."""
    n = len(value) if isinstance(value, str) else 0
    if name in ("center", "ljust", "rjust", "zfill"):
        return _int(_arg(args, kwargs, 0, "width"))
    if name == "expandtabs" and n:
        return n + value.count("\t") * _int(_arg(args, kwargs, 0, "tabsize", 8))
    if name == "replace" and n:
        old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
        if isinstance(old, str) and isinstance(new, str):
            return n + (value.count(old) if old else n + 1) * len(new)
    if name == "indent" and n:
        width = _arg(args, kwargs, 0, "width", 4)
        return n + (value.count("\n") + 1) * (len(width) if isinstance(width, str) else _int(width))
    if name == "wordwrap":
        return n * (1 + len(str(_arg(args, kwargs, 2, "wrapstring", "") or "")))
    if name in ("batch", "slice"):
        return _int(_arg(args, kwargs, 0, "linecount" if name == "batch" else "slices"))
    if name == "join" and isinstance(value, (list, tuple)):  # the filter: items|join(separator)
        return len(value) * len(str(_arg(args, kwargs, 0, "d", "")))
    if name == "str.join":  # the method: separator.join(items)
        items = _arg(args, kwargs, 0, "iterable")
        return len(items) * n if isinstance(items, (list, tuple)) else 0
    if name == "format":
        return _format_size(value, percent=True)
    return 0


def _metered_filter(name: str, func):
    takes = getattr(getattr(func, "jinja_pass_arg", None), "name", None)  # pass_context & co

    @pass_context  # (which also keeps Jinja from running it on constants when compiling)
    def metered(context, value, *args, **kwargs):
        budget = _budget.get()
        budget.step()
        if name == "join":  # (it takes any iterable: count the items before they are joined)
            value = list(value)
        budget.spend(_growth(name, value, args, kwargs))
        first = {"context": (context,), "eval_context": (context.eval_ctx,),
                 "environment": (context.environment,)}.get(takes, ())
        return budget.made(func(*first, value, *args, **kwargs))
    return metered


@pass_context
def _finalize(context, value):  # every printed value
    return _budget.get().made(value)


class _Namespace(Namespace):
    """Jinja's namespace(), printed without what it holds: a namespace is the one object a
    template can change, so the budget cannot know what printing it would cost."""

    def __repr__(self) -> str:
        return "<namespace>"


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    # Jinja's sandbox answers an unsafe attribute (``x.__class__``) with an Undefined that only
    # fails when used further, and prints as ""; refuse at once instead
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a "
                            f"{type(obj).__name__} is not allowed in a chat template")

    def call(__self, __context, __obj, *args, **kwargs):  # (names no keyword argument can take)
        if getattr(__obj, "__self__", None) is __self:  # tritlm_pass, tritlm_made: they count
            return __obj(*args)
        budget = _budget.get()
        budget.step()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):  # a str method
            name = getattr(__obj, "__name__", "")
            if name == "join" and args:  # (it takes any iterable: count the items first)
                args = (list(args[0]),)
            budget.spend(_growth("str.join" if name == "join" else name, owner, args, kwargs))
        return budget.made(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        budget = _budget.get()
        budget.step()
        if operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
            bits = (abs(left).bit_length() * abs(right) if operator == "**"
                    else left.bit_length() + right.bit_length())
            if bits > MAX_INT_BITS:
                raise ChatTemplateError(f"chat template: an integer of more than {MAX_INT_BITS} bits")
        elif operator == "*":  # repetition: 'x' * n, [x] * n
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sized, (str, list, tuple)) and isinstance(count, int):
                budget.spend(len(sized) * max(count, 0))
        elif operator == "%":
            budget.spend(_format_size(left, percent=True))
        return budget.made(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value):
        format_ = super().wrap_str_format(value)
        if format_ is None:
            return None

        def checked(*args, **kwargs):
            _budget.get().spend(_format_size(value.__self__, percent=False))
            return format_(*args, **kwargs)
        return checked

    # called by the code _Instrument adds to a template
    def tritlm_pass(self, literal_chars: int) -> None:
        """One pass of a loop, or call of a macro, whose body holds `literal_chars` of text."""
        budget = _budget.get()
        budget.step()
        budget.spend(literal_chars)

    def tritlm_made(self, value):
        return _budget.get().made(value)


class _Instrument(NodeTransformer):
    """Rewrites a parsed template so that every loop pass and macro call, and every list, dict,
    tuple and ~ concatenation it builds, is counted; refuses include, import and extends."""

    @staticmethod
    def _call(method: str, node, *args):
        return nodes.Call(nodes.EnvironmentAttribute(method), list(args), [], None, None,
                          lineno=node.lineno)

    def _counted_body(self, node):
        node = self.generic_visit(node)
        chars = sum(len(d.data) for child in node.body for d in child.find_all(nodes.TemplateData))
        count = self._call("tritlm_pass", node, nodes.Const(chars))
        node.body.insert(0, nodes.ExprStmt(count, lineno=node.lineno))
        return node

    visit_For = visit_Macro = visit_CallBlock = visit_Block = _counted_body

    def _made(self, node):
        return self._call("tritlm_made", node, self.generic_visit(node))

    visit_List = visit_Dict = visit_Concat = _made

    def visit_Tuple(self, node):
        return self._made(node) if node.ctx == "load" else self.generic_visit(node)

    def _refuse(self, node):
        raise ChatTemplateError(f"chat template line {node.lineno}: a chat template cannot "
                                "include, import or extend other templates")

    visit_Include = visit_Import = visit_FromImport = visit_Extends = _refuse


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
    if _int(indent) > 64 or isinstance(indent, str) and len(indent) > 64:
        raise ChatTemplateError("chat template: tojson indent over 64")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(template: str):
    # the settings transformers renders templates with, so that whitespace comes out the same
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag],
                   finalize=_finalize)
    env.filters["tojson"] = _tojson
    env.filters = {name: _metered_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["namespace"] = _Namespace
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    del env.globals["lipsum"]  # (no template uses it; it makes as much text as it is asked)
    try:
        tree = _Instrument().visit(env.parse(template))
        tree.set_environment(env)
        return env.from_string(tree)
    except ChatTemplateError:
        raise
    except Exception as e:  # a syntax error, or a template nested too deeply to compile
        raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {e}") from e
