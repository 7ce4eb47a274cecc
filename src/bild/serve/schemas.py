"""Request bodies of the OpenAI-compatible API: the OpenAI parameters bild supports plus BiLD's extra body fields.

Validation is strict (a string is not a number, a float is not an integer) and unknown fields are refused, as the
OpenAI API does, so a typo such as ``fallback_treshold`` is an error instead of being silently ignored. OpenAI
parameters bild does not implement are accepted only with the value that means "off" (``logprobs: false``,
``presence_penalty: 0``), which common clients send by default.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # the OpenAI limit
MAX_BODY_BYTES = 8 * 2**20  # far above any prompt the server accepts; refuses memory-filling bodies early
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800" escape decodes to one; no tokenizer takes it


def check_text(text: str) -> str:
    """Refuse text that is not valid Unicode (a lone UTF-16 surrogate), naming where it is."""
    if found := _LONE_SURROGATE.search(text):
        raise ValueError(
            f"contains a lone UTF-16 surrogate (\\u{ord(found.group()):04x} at character {found.start()}), which is "
            "not valid Unicode: encode the text as UTF-8 (a JSON string escape must pair high and low surrogates)"
        )
    return text


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _not_nan(cls, value):
        """Before the range checks, which would otherwise say 'should be <= 2' about a NaN."""
        if isinstance(value, float) and math.isnan(value):
            raise ValueError("NaN is not a number: send a number")
        return value


class StreamOptions(_Strict):
    include_usage: bool = False  # send one more chunk, with empty choices, that carries the usage


# OpenAI parameters bild does not implement, and the value of each that asks for nothing (or leave the field out).
_NO_OP_VALUES = {"logprobs": False, "top_logprobs": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


class GenerationParams(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions; None means the server's default."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # 0 = greedy
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None  # one completion per request (batch size 1, as in the paper)
    user: str | None = None  # accepted for compatibility, unused
    # accepted only as no-ops (_NO_OP_VALUES); clients such as LangChain send them by default
    logprobs: bool | int | None = None  # bool on chat, int on completions
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # BiLD extra body fields (the openai client sends them with extra_body={...})
    fallback_threshold: Annotated[float, Field(ge=0, le=1)] | None = None  # alpha_FB
    rollback_threshold: Annotated[float, Field(ge=0)] | None = None  # alpha_RB; JSON Infinity = never roll back
    max_small_steps: Annotated[int, Field(ge=1, le=1024)] | None = None  # N
    repeat_ngram: Annotated[int, Field(ge=0, le=1024)] | None = None  # repetition guard, 0 = off (not in the paper)
    policy: Literal["adaptive", "fixed"] | None = None  # drafting policy (adaptive is not in the paper)
    lookup: Annotated[int, Field(ge=0, le=1024)] | None = None  # lookup drafting n-gram, 0 = off (not in the paper)

    @field_validator(*_NO_OP_VALUES)
    @classmethod
    def _only_no_op(cls, value, info):
        no_op = _NO_OP_VALUES[info.field_name]
        # `False == 0` in Python: compare types too, so logprobs: 0 is refused like any other number
        if value is not None and not (type(value) is type(no_op) and value == no_op):
            shown = "false" if no_op is False else f"{no_op:g}"
            raise ValueError(f"bild does not support {info.field_name}; send {shown} or leave it out")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(stop == "" for stop in stops):
            raise ValueError("stop strings must be non-empty")
        return [check_text(stop) for stop in stops]


class CompletionRequest(GenerationParams):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]  # one prompt: n = 1, batch size 1
    echo: Literal[False] | None = None

    @field_validator("prompt")
    @classmethod
    def _valid_text(cls, value: str | list[str]) -> str | list[str]:
        for text in [value] if isinstance(value, str) else value:
            check_text(text)
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Strict):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _valid_text(cls, value: str) -> str:
        return check_text(value)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _valid_text(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        return check_text(value) if isinstance(value, str) else value

    def as_template_message(self) -> dict[str, str]:
        """The {"role", "content"} form chat templates expect; 'developer' is the newer name of 'system'."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(GenerationParams):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
