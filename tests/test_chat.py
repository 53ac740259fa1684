"""tritlm.chat: the 2B4T format against FORMATS.md, Jinja templates against transformers'
apply_chat_template, the sandbox, and message validation."""

import time

import pytest

from tritlm import chat
from tritlm.chat import ChatTemplateError, format_chat, recognise_bitnet_2b4t

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "  What is 2+2? Ünïcødé 中文 🚀\nTwo lines.  "},
]


# ---------------------------------------------------------------------- 2B4T (FORMATS.md)


def test_bitnet_2b4t_format_is_the_spec():
    # FORMATS.md: <|begin_of_text|>, then "Role: content<|eot_id|>" per message, then
    # "Assistant: " to generate
    want = ("<|begin_of_text|>System: You are terse.<|eot_id|>User: Hi there<|eot_id|>"
            "Assistant: Hello.<|eot_id|>"
            "User:   What is 2+2? Ünïcødé 中文 🚀\nTwo lines.  <|eot_id|>Assistant: ")
    assert format_chat(CONVERSATION, None, model_hint="bitnet-b1.58") == want
    assert format_chat(CONVERSATION, None, model_hint="bitnet-b1.58",
                       add_generation_prompt=False) == want[:-len("Assistant: ")]
    assert format_chat([{"role": "user", "content": "Hey"}], None, model_hint="bitnet-25") == \
        "<|begin_of_text|>User: Hey<|eot_id|>Assistant: "


def test_bitnet_2b4t_overrides_the_files_template():
    wrong = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for hint in ("bitnet-b1.58", "bitnet-25", "BitNetForCausalLM", "microsoft/bitnet-b1.58-2B-4T"):
        assert recognise_bitnet_2b4t(hint, wrong)
        assert format_chat(CONVERSATION[1:2], wrong, model_hint=hint) == \
            "<|begin_of_text|>User: Hi there<|eot_id|>Assistant: "
    # 1bitLLM models (GGUF arch "bitnet", HF BitnetForCausalLM) and Llama-3 models are not 2B4T
    for hint in ("bitnet", "BitnetForCausalLM", "llama"):
        assert not recognise_bitnet_2b4t(hint, None, vocab_size=128256, has_eot_id=True)
        assert format_chat(CONVERSATION[1:2], wrong, model_hint=hint) == "Hi there"
    # without a hint: a 2B4T-shaped vocabulary with no template
    assert recognise_bitnet_2b4t("", None, vocab_size=128256, has_eot_id=True)
    assert not recognise_bitnet_2b4t("", wrong, vocab_size=128256, has_eot_id=True)
    assert not recognise_bitnet_2b4t("", None, vocab_size=32000, has_eot_id=False)
    with pytest.raises(ValueError, match="tool"):
        format_chat([{"role": "tool", "content": "42"}], None, model_hint="bitnet-b1.58")


def test_no_template_and_not_recognised():
    for hint in ("", "llama"):
        with pytest.raises(ValueError, match="no chat template"):
            format_chat(CONVERSATION, None, model_hint=hint)


# ---------------------------------------------------------------------- Jinja vs transformers

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3_LIKE = """{{ bos_token }}
{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|start_header_id|>system<|end_header_id|>\\n\\nDefault<|eot_id|>' }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

# no whitespace control: only trim_blocks / lstrip_blocks make this come out right
BLOCKY = """{% for m in messages %}
  {% if m.role == 'system' %}
[SYS] {{ m.content }}
  {% else %}
{{ m.role | upper }}: {{ m.content }}{{ eos_token }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}ASSISTANT:{% endif %}
"""

FANCY = """{%- set ns = namespace(n=0) -%}
{%- if tools is defined and tools %}TOOLS {{ tools | tojson }}
{% endif -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% continue %}{% endif -%}
  {%- if loop.index > 6 %}{% break %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}
  [{{ ns.n }}] {{ m | tojson }}
  {%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}
{% endfor -%}
{{ '<go>' if add_generation_prompt else '' }}"""

ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
               "{{ m['content'] }}{% endfor %}")


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


MESSAGE_LISTS = [
    CONVERSATION,
    CONVERSATION[1:],
    [{"role": "user", "content": "<b>\"quotes\" & ünïcode</b>"}],
    CONVERSATION + [{"role": "tool", "content": "{\"x\": 1}", "name": "calc"},
                    {"role": "assistant", "content": ""}] * 3,
]


@pytest.mark.parametrize("template", [CHATML, LLAMA3_LIKE, BLOCKY, FANCY],
                         ids=["chatml", "llama3", "blocky", "fancy"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_matches_transformers(hf_tokenizer, template, add_generation_prompt):
    tools = [{"type": "function", "function": {"name": "calc", "description": "ünï <x>"}}]
    for messages in MESSAGE_LISTS:
        want = hf_tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, tools=tools,
            add_generation_prompt=add_generation_prompt)
        got = format_chat(messages, template, bos_token="<s>", eos_token="</s>",
                          add_generation_prompt=add_generation_prompt, tools=tools)
        assert got == want


def test_raise_exception_in_template(hf_tokenizer):
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert format_chat(ok, ALTERNATING) == hf_tokenizer.apply_chat_template(
        ok, chat_template=ALTERNATING, tokenize=False)
    with pytest.raises(ValueError, match="roles must alternate"):
        format_chat(ok[::-1], ALTERNATING)
    with pytest.raises(ChatTemplateError, match="compile"):
        format_chat(ok, "{% for m in messages %}")


# ---------------------------------------------------------------------- sandbox


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('{marker}', 'w') }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}{{ messages | length }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ bos_token.format.__globals__ }}",
])
def test_sandbox_escape_raises(tmp_path, template):
    marker = tmp_path / "escaped"
    with pytest.raises(ValueError):
        format_chat(CONVERSATION, template.replace("{marker}", str(marker)), bos_token="<s>")
    assert not marker.exists()


# ---------------------------------------------------------------------- limits
# A template comes from a model file: whatever it does, rendering it ends soon, in bounded
# memory, with a ChatTemplateError (a ValueError) when it goes too far.

STEPS = "more than 20000 steps"
CHARS = "makes more than"
LIMITS = {
    "nested range": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                     "{% endfor %}", STEPS),
    "nested loop over text": ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}"
                              "{% endfor %}{% endfor %}", STEPS),
    "huge range": ("{{ range(10**9) | list | length }}", "MAX_RANGE"),
    "exponential macro": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                          "{% endmacro %}{{ f(60) }}", STEPS),
    "endless macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    "string repetition": ("{{ 'x' * 10**9 }}", CHARS),
    "list repetition": ("{{ ([1] * 10**9) | length }}", CHARS),
    "integer power": ("{{ 10 ** 100000 }}", "bits"),
    "format width": ("{{ '{:>1000000000}'.format('x') }}", CHARS),
    "percent width": ("{{ '%.1000000000f' % 1.0 }}", CHARS),
    "center": ("{{ 'x' | center(10**9) }}", CHARS),
    "replace": ("{% set s = 'x' * 100000 %}{{ s | replace('', s) }}", CHARS),
    "join": ("{{ range(100000) | join('x' * 100000) }}", CHARS),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(60) %}"
                 "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", CHARS),
    "doubling a block": ("{% set ns = namespace(s='xx') %}{% for i in range(60) %}{% set b %}"
                         "{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = b %}{% endfor %}", CHARS),
    "doubling a list": ("{% set ns = namespace(l=[1]) %}{% for i in range(80) %}"
                        "{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}", CHARS),
    "text in a loop": ("{% for i in range(100000) %}" + "y" * 100000 + "{% endfor %}", CHARS),
    "include": ("{% include 'other.jinja' %}", "cannot include, import or extend"),
    "import": ("{% import 'other.jinja' as other %}", "cannot include, import or extend"),
    "from import": ("{% from 'other.jinja' import f %}", "cannot include, import or extend"),
    "extends": ("{% extends 'other.jinja' %}", "cannot include, import or extend"),
    "raises": ("{{ raise_exception('no tools here') }}", "no tools here"),
    "fails": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "deep nesting": ("{% if 1 %}" * 5000 + "{% endif %}" * 5000, "does not compile"),
}


@pytest.mark.parametrize("template, match", LIMITS.values(), ids=LIMITS.keys())
def test_template_limits(monkeypatch, template, match):
    monkeypatch.setattr(chat, "MAX_STEPS", 20000, raising=False)  # (quicker to reach than the 1000000 default)
    with pytest.raises(ChatTemplateError, match=match):
        format_chat(CONVERSATION, template)


def test_template_time_limit(monkeypatch):
    monkeypatch.setattr(chat, "MAX_SECONDS", 0.2, raising=False)
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="took more than 0.2 s"):
        format_chat(CONVERSATION, "{% for i in range(100000) %}{% for j in range(100000) %}"
                                  "{% endfor %}{% endfor %}")
    assert time.monotonic() - start < 2


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("messages, match", [
    ("hello", "list"),
    ([["user", "hi"]], r"messages\[0\] must be a dict"),
    ([{"role": "bot", "content": "hi"}], r"messages\[0\]: role must be one of"),
    ([{"content": "hi"}], "role must be one of"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\] \(user\): content"),
    ([{"role": "user", "content": None}], "content must be a str"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "content must be a str"),
])
def test_bad_messages(messages, match):
    for template, hint in ((CHATML, ""), (None, "bitnet-b1.58")):
        with pytest.raises(ValueError, match=match):
            format_chat(messages, template, model_hint=hint)
