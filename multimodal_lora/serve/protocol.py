"""The OpenAI chat-completions protocol, as far as an image captioner speaks it.

Requests are validated here, once, into :class:`ChatRequest`; everything a
client can get wrong becomes an :class:`APIError` with the HTTP status, the
OpenAI error ``type``, the offending ``param`` and a message that says what to
do. Responses are built by the ``*_body`` functions in the shapes the official
client parses (``chat.completion``, ``chat.completion.chunk``, ``list`` of
``model``, and ``{"error": {...}}``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

MAX_STOP_SEQUENCES = 4  # as OpenAI's API


class APIError(Exception):
    """An error for the client, sent as OpenAI-shaped JSON with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API and the client expect."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):
        # Keyword arguments do not survive an exception's default pickling (the engine process sends these).
        return _api_error, (self.status, self.message, self.type, self.param, self.code)


def _api_error(status: int, message: str, type: str, param: str | None, code: str | None) -> APIError:
    return APIError(status, message, type=type, param=param, code=code)


def unavailable(message: str, code: str) -> APIError:
    """A 503: the server cannot take the request now (``queue_full``, ``shutting_down``, ``engine_stopped``)."""
    return APIError(503, message, type="server_error", code=code)


def queue_full(count: int, limit: int, where: str) -> APIError:
    """The 503 for a request over ``--max-queue``: ``count`` requests are ``where`` already."""
    return unavailable(f"the server is busy: {count} requests are already {where} (--max-queue {limit}); retry shortly", "queue_full")


def as_api_error(error: BaseException) -> APIError:
    """What the client is told of ``error``: itself if an :class:`APIError`, a 400 for a
    :class:`~multimodal_lora.core.errors.UserError` (its message says what to do), else a 500 that
    points to the server's log (which has the traceback) and leaks nothing of the internals."""
    from multimodal_lora.core.errors import UserError

    if isinstance(error, APIError):
        return error
    if isinstance(error, UserError):
        return APIError(400, str(error))
    return APIError(500, "generation failed; the server log has the details", type="server_error")


# --- what arrives --------------------------------------------------------------------------------


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[_Part] | None = None


class _Request(BaseModel):
    # Fields of the OpenAI API this server does not use (user, seed, logprobs...) are accepted and ignored.
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[_Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen; requests with equal ``Sampling`` may share one ``generate`` call."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class ChatRequest:
    """A validated request: one image, its text, and how to generate."""

    model: str
    image_url: str
    text: str | None
    max_tokens: int | None
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_request(raw: bytes) -> ChatRequest:
    """Validate a request body; every problem is an :class:`APIError` (400) naming the field.

    The last ``user`` message is the one answered: its ``image_url`` part is the
    image (exactly one), its text parts joined are the question or caption prefix.
    """
    try:
        request = _Request.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON ({first['msg']})", param=None) from None
        raise APIError(
            400, f"{where}: {first['msg']} ({exc.error_count()} problem(s) in the request)", param=where
        ) from None
    if request.n != 1:
        raise APIError(400, f"n={request.n}: this server returns one choice per request; send n=1", param="n")
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise APIError(
            400,
            "messages: no user message; send one with an image_url part (and optionally a text part)",
            param="messages",
        )
    content = users[-1].content
    parts = [_Part(type="text", text=content)] if isinstance(content, str) else list(content or [])
    images = [p for p in parts if p.type == "image_url"]
    unknown = sorted({p.type for p in parts} - {"text", "image_url"})
    if unknown:
        raise APIError(
            400,
            f"messages: content parts of type {', '.join(unknown)} are not supported; use text and image_url",
            param="messages",
        )
    if not images:
        raise APIError(
            400,
            "messages: no image in the user message; add a part {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}}",
            param="messages",
            code="missing_image",
        )
    if len(images) > 1:
        raise APIError(
            400,
            f"messages: {len(images)} images in the user message; send exactly one per request",
            param="messages",
            code="too_many_images",
        )
    url = images[0].image_url
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url:
        raise APIError(400, "messages: the image_url part has no url", param="messages")
    texts = [p.text for p in parts if p.type == "text" and p.text and p.text.strip()]
    text = " ".join(t.strip() for t in texts) or None

    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1 (got {max_tokens})", param="max_tokens")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise APIError(400, f"stop: up to {MAX_STOP_SEQUENCES} non-empty strings (got {stop!r})", param="stop")
    include_usage = bool((request.stream_options or {}).get("include_usage", False))
    return ChatRequest(
        model=request.model,
        image_url=url,
        text=text,
        max_tokens=max_tokens,
        sampling=sampling(request.temperature, request.top_p),
        stop=stop,
        stream=request.stream,
        include_usage=include_usage,
    )


def sampling(temperature: float | None, top_p: float | None) -> Sampling:
    """Greedy unless asked otherwise: no temperature (or 0) is greedy, like :func:`~multimodal_lora.caption`.

    OpenAI's API samples at temperature 1 by default; a captioner is more useful
    deterministic, so an omitted temperature means greedy here (documented in the README).
    """
    if temperature is not None and not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2 (got {temperature})", param="temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1] (got {top_p})", param="top_p")
    if temperature == 0 or (temperature is None and (top_p is None or top_p == 1)):
        return Sampling()
    return Sampling(
        do_sample=True,
        temperature=temperature if temperature is not None else 1.0,
        top_p=top_p if top_p is not None else 1.0,
    )


# --- what goes back ------------------------------------------------------------------------------


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    id: str, model: str, content: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict:
    """A ``chat.completion`` object with one choice."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_body(prompt_tokens, completion_tokens),
    }


def chunk_body(
    id: str, model: str, delta: dict, finish_reason: str | None = None, usage: dict | None = None, choices: bool = True
) -> dict:
    """A ``chat.completion.chunk``: a delta of the one choice (or, with ``choices=False``, only usage)."""
    body = {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    body["choices"] = (
        [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}] if choices else []
    )
    if usage is not None:
        body["usage"] = usage
    return body


def models_body(names: list[str], owned_by: str = "multimodal_lora") -> dict:
    """``GET /v1/models``: a ``list`` of ``model`` objects."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": created, "owned_by": owned_by} for n in names],
    }


FinishReason = Literal["stop", "length"]
