"""Request bodies of the OpenAI-compatible API: the OpenAI parameters bild supports plus BiLD's extra body fields.

Validation is strict (a string is not a number, a float is not an integer) and unknown fields are refused, as the
OpenAI API does, so a typo such as ``fallback_treshold`` is an error instead of being silently ignored.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # the OpenAI limit


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False  # send one more chunk, with empty choices, that carries the usage


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
    # BiLD extra body fields (the openai client sends them with extra_body={...})
    fallback_threshold: Annotated[float, Field(ge=0, le=1)] | None = None  # alpha_FB
    rollback_threshold: Annotated[float, Field(ge=0)] | None = None  # alpha_RB; JSON Infinity = never roll back
    max_small_steps: Annotated[int, Field(ge=1, le=1024)] | None = None  # N
    repeat_ngram: Annotated[int, Field(ge=0, le=1024)] | None = None  # repetition guard, 0 = off (not in the paper)
    policy: Literal["adaptive", "fixed"] | None = None  # drafting policy (adaptive is not in the paper)

    @field_validator("temperature", "top_p", "fallback_threshold", "rollback_threshold")
    @classmethod
    def _not_nan(cls, value: float | None) -> float | None:
        if value is not None and math.isnan(value):
            raise ValueError("must be a number, not NaN")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(stop == "" for stop in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class CompletionRequest(GenerationParams):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]  # one prompt: n = 1, batch size 1
    echo: Literal[False] | None = None

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        """The {"role", "content"} form chat templates expect; 'developer' is the newer name of 'system'."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(GenerationParams):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
