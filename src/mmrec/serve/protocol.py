"""The OpenAI request bodies ``mmrec serve`` accepts, their limits, the chat template and the error body.

Bodies are validated strictly (pydantic strict mode: ``"max_tokens": "5"`` is a wrong type, not 5), so a
client learns what it sent wrong from a 400 with an OpenAI-style error naming the field. Fields of the
OpenAI API that change nothing here (``user``, ``logit_bias`` {} ...) are accepted and ignored; those
that would change the output and are not implemented (``logprobs``, ``n`` > 1, penalties) are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmrec.serve.sessions import check_session_id

MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may run and wait."""

    max_body_bytes: int = 1 << 20  # 413 above
    max_tokens: int = 4096  # 400 for a larger max_tokens
    max_prompt_tokens: int = 65536  # 400 for a longer prompt (after the chat template)
    max_batch: int = 16  # streams decoding at once
    max_queue: int = 64  # requests waiting for a slot; 429 beyond
    max_session_waiting: int = 4  # requests waiting for one session while another runs on it; 429 beyond
    prefill_chunk: int = 2048  # prompt tokens fed per engine step, so long prompts do not stall decoding

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be an integer >= 1, got {value!r}")


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # What a client sent may come back in the message: lone surrogates have no UTF-8 form, so they go.
        message = message.encode("utf-8", errors="replace").decode("utf-8")
        param = None if param is None else param.encode("utf-8", errors="replace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # not in the OpenAI API; vLLM and llama.cpp accept it too
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    session: str | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not 0.0 <= v <= 2.0:
            raise ValueError("must be between 0 and 2 (0 is greedy)")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be an integer >= 1")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_SEED:
            raise ValueError(f"must be between 0 and {MAX_SEED}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must be 1 to {MAX_STOP_CHARS} characters")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: Any) -> Any:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported (only 0)")
        return v

    @field_validator("session")
    @classmethod
    def _session(cls, v: str | None) -> str | None:
        return None if v is None else check_session_id(v)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("give one prompt (a string, or a list of exactly one string)")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The chat template: one ``Role: content`` line per message, then ``Assistant:`` for the reply.

    Plain text, because mmrec models are trained on plain text; within a session only the new messages
    are sent and rendered, after the reply the state already holds."""
    return "".join(f"{ROLE_NAMES[m.role]}: {m.text()}\n" for m in messages) + "Assistant:"


# Names pydantic puts in an error's location for the member of a union that failed, not a field.
_VARIANT = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-\w+\[.*\]|literal\[.*\]|[A-Z]\w*)$")


def validation_error(error: ValidationError) -> APIError:
    """The first problem of a pydantic error, as a 400 naming the field."""
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if not _VARIANT.match(str(p))]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = f"'{param}': " if param else ""
    return APIError(400, f"{where}{msg}", param=param, code="invalid_value")
