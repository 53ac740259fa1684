"""Request bodies of the OpenAI API, checked strictly (a string where a number belongs is an
error, as it is for OpenAI; so are Infinity and NaN, which Python's JSON reader takes, and text
with a lone surrogate, which JSON can carry and Unicode text can't). Fields OpenAI has and tritlm
ignores (user, tools, ...) pass silently; `top_k`, `min_p`, `repeat_penalty` and `ignore_eos` are
llama.cpp-style extras, `speculative` tritlm's.

Validation runs on the event loop, holding the GIL, so it must stay cheap whatever the body: lists
of objects are capped (a list too long is refused before its items are looked at), a prompt that
may be text, texts, token ids or lists of them is validated as the one its first element says it
is (checked against every member, a list of a million ids would collect a million errors per
wrong member), and a list of texts is checked for surrogates in one go."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone surrogate ({text[e.start]!a}) at {e.start}") from None
    return text


def _unicode_items(texts: list[str]) -> list[str]:
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        for i, text in enumerate(texts):
            try:
                _unicode(text)
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
    return texts


MAX_ITEMS = 2048  # prompts, embedding inputs, messages, content parts: more is refused (400)

Text = Annotated[str, AfterValidator(_unicode)]
Texts = Annotated[list[str], Field(max_length=MAX_ITEMS), AfterValidator(_unicode_items)]


def _shape(value) -> str:
    """The member of a TextsOrTokens union that `value` is meant to be (the tags name them the
    way pydantic names union members, which error locations then leave out)."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        return "list[str]" if isinstance(value[0], str) else "list[list[int]]"
    return "list[int]"


TextsOrTokens = Annotated[Annotated[Text, Tag("str")] | Annotated[Texts, Tag("list[str]")]
                          | Annotated[list[int], Tag("list[int]")]
                          | Annotated[list[list[int]], Tag("list[list[int]]"), Field(max_length=MAX_ITEMS)],
                          Discriminator(_shape), Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)  # OpenAI caps it at 2; llama.cpp does not
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Text | Annotated[list[Text], Field(max_length=16)] | None = None  # a string is one
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    speculative: bool | None = None  # tritlm's: false opts out of the server's --lookup/--draft, true opts in


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_ITEMS)] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_ITEMS)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # tritlm's: a conversation too long for the context loses its oldest turns ("dropped_messages")
    truncate: Literal["oldest"] | None = None


class CompletionRequest(_Sampling):
    prompt: TextsOrTokens
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class EmbeddingRequest(_Body):
    model: Text | None = None
    input: TextsOrTokens
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
