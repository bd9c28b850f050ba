"""The HTTP app: ``GET /v1/models`` and ``POST /v1/chat/completions`` on FastAPI.

Each request is checked completely before it joins a batch (key, body size,
JSON, model, image, prompt length), so a bad request is answered with a 4xx
at once and never reaches the model with other people's requests. Then it
waits for its batch (a :class:`~multimodal_lora.serve.batcher.Batcher` here, or
in the model's own process through an
:class:`~multimodal_lora.serve.engine_process.EngineProcess`), and is answered as one JSON object or, with ``stream: true``, as server-sent events in
OpenAI's ``chat.completion.chunk`` format ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

# Module level, not inside create_app: FastAPI resolves the handlers' (string) annotations here.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from multimodal_lora.core.tasks import TASKS
from multimodal_lora.serve.batcher import Batcher
from multimodal_lora.serve.engine import Job
from multimodal_lora.serve.engine_process import EngineProcess
from multimodal_lora.serve.images import ImageLimits, RemotePolicy, read_image
from multimodal_lora.serve.protocol import (
    APIError,
    as_api_error,
    chunk_body,
    completion_body,
    models_body,
    new_id,
    parse_request,
    usage_body,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """Everything about the server that is not the model."""

    api_key: str | None = None
    """Clients must send ``Authorization: Bearer KEY`` (``None``: no key, for loopback only)."""
    max_body_bytes: int = 25 * 1024 * 1024
    default_max_tokens: int = 30
    """``max_tokens`` when a request gives none (as :func:`~multimodal_lora.caption`)."""
    images: ImageLimits = field(default_factory=ImageLimits)
    remote: RemotePolicy = field(default_factory=RemotePolicy)


class _Sink:
    """Carries a job's results into the request's event loop from the thread that hears them
    (an in-process batcher's, or the reader of the model's process).

    Waking the event loop from another thread is a system call (asyncio's
    self-pipe), and a batch of 16 makes 16 deltas a token: that alone was 9% of
    the server's time. So the thread only queues items, and wakes the loop when
    no wake-up is pending already; an answer that is not streamed keeps its
    deltas on this side and wakes the loop once, when it is finished.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool):
        self.loop = loop
        self.stream = stream
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._ready = asyncio.Event()
        self._text: list[str] = []  # the deltas of an answer that is not streamed

    def _put(self, item) -> None:
        with self._lock:
            self._items.append(item)
            if self._wake_pending:
                return
            self._wake_pending = True
        self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    def delta(self, text: str) -> None:
        if self.stream:
            self._put(("delta", text))
        else:
            self._text.append(text)

    def finish(self, finish_reason: str, completion_tokens: int) -> None:
        self._put(("finish", finish_reason, completion_tokens))

    def fail(self, error: BaseException) -> None:
        self._put(("fail", error))

    async def items(self):
        """The items in order, as they come: ``("delta", text)``, then ``("finish", reason, tokens)`` or ``("fail", error)``."""
        while True:
            self._ready.clear()
            with self._lock:
                batch = list(self._items)
                self._items.clear()
            if not batch:
                # Nothing can slip in between the check and the wait: _wake runs on this loop.
                await self._ready.wait()
                continue
            for item in batch:
                yield item
                if item[0] != "delta":
                    return

    def text(self) -> str:
        """An answer that is not streamed: everything the deltas said."""
        return "".join(self._text)


def _pixels(captioner, url: str, settings: ServerSettings):
    return captioner.pixels(read_image(url, settings.images, settings.remote))


def create_app(captioner, batcher: Batcher | EngineProcess, settings: ServerSettings = ServerSettings()):
    """The FastAPI app serving ``captioner``'s base and adapters through ``batcher``.

    ``batcher`` answers jobs: a :class:`Batcher` on ``captioner``'s model in this process, or
    (as ``python -m multimodal_lora.serve`` runs it) an :class:`EngineProcess` with
    ``captioner`` its :meth:`~multimodal_lora.inference.captioner.Captioner.without_model` view.

    Model names: the base's name (``captioner.base.name``, e.g. ``tiny``) means
    no adapter; every loaded adapter by its name.
    """
    base_name = captioner.base.name
    app = FastAPI(title="multimodal_lora", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.captioner = captioner
    app.state.batcher = batcher
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        # Batches against requests answered: how much batching happened (the tests and the bench read it).
        return {"status": "ok", **batcher.counters()}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, settings.api_key)
        return models_body([base_name, *captioner.adapter_names])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(request, settings.api_key)
        chat = parse_request(await _read_body(request, settings.max_body_bytes))
        adapter = _to_adapter(captioner, chat.model)
        prompt, prompt_tokens, max_tokens = _prompt(captioner, chat, adapter, settings.default_max_tokens)
        # Decoded and turned into pixels here, beside the batch that is running, not at the start of ours.
        image = await asyncio.to_thread(_pixels, captioner, chat.image_url, settings)
        prompt_tokens = captioner.prompt_tokens(prompt, image)  # this image's own count (the check above took the most)
        sink = _Sink(asyncio.get_running_loop(), stream=chat.stream)
        job = Job(adapter, image, prompt, prompt_tokens, max_tokens, chat.sampling, chat.stop, sink, stream=chat.stream)
        batcher.submit(job)
        completion_id = new_id()
        if chat.stream:
            return StreamingResponse(
                _events(job, sink, completion_id, chat.model, chat.include_usage), media_type="text/event-stream"
            )
        try:
            async for item in sink.items():
                if item[0] == "finish":
                    return completion_body(completion_id, chat.model, sink.text(), item[1], prompt_tokens, item[2])
                if item[0] == "fail":
                    raise as_api_error(item[1])
        finally:
            job.cancelled.set()  # a no-op once done; stops the row if the client went away

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, as an OpenAI-style error body."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.code == "queue_full" else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        error = APIError(
            exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type="invalid_request_error"
        )
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # Constant time: how much of a guess matched must not show in the response time.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(
            401,
            "missing or wrong API key; send the header Authorization: Bearer KEY",
            type="invalid_request_error",
            code="invalid_api_key",
        )


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_large = APIError(
        413,
        f"the request body is over {limit:,} bytes (--max-body-bytes); send a smaller image",
        code="body_too_large",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a chunked body gives no length up front
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _to_adapter(captioner, model: str) -> str | None:
    base_name = captioner.base.name
    if model == base_name:
        return None
    if model in captioner.adapters:
        return model
    known = ", ".join([base_name, *captioner.adapter_names])
    raise APIError(
        404,
        f"model {model!r} does not exist; GET /v1/models lists them: {known}",
        param="model",
        code="model_not_found",
    )


def _prompt(captioner, chat, adapter: str | None, default_max_tokens: int) -> tuple[str, int, int]:
    """``(prompt, its tokens, max_tokens)`` for a request, refused when it does not fit the model's context."""
    if TASKS[captioner.task(adapter)].asks:
        if not chat.text:
            raise APIError(
                400,
                f"messages: {chat.model!r} answers questions; add a text part with the question",
                param="messages",
                code="missing_question",
            )
        prompt = captioner.vqa_prompt(adapter, chat.text)
    else:
        prompt = captioner.caption_prompt(adapter, chat.text)
    prompt_tokens = captioner.prompt_tokens(prompt)
    max_tokens = chat.max_tokens or default_max_tokens
    if not captioner.fits(prompt_tokens, max_tokens):
        context = captioner.context_length
        raise APIError(
            400,
            f"this model's context is {context} tokens, but the request needs {prompt_tokens + max_tokens - 1} "
            f"({prompt_tokens} for the image and prompt, {max_tokens} for max_tokens); shorten the text or lower max_tokens",
            param="messages",
            code="context_length_exceeded",
        )
    return prompt, prompt_tokens, max_tokens


async def _events(job: Job, sink: _Sink, completion_id: str, model: str, include_usage: bool):
    """Server-sent events: a role chunk, content deltas, a finish chunk, usage if asked, ``[DONE]``."""

    def event(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield event(chunk_body(completion_id, model, {"role": "assistant", "content": ""}))
        async for item in sink.items():
            if item[0] == "delta":
                yield event(chunk_body(completion_id, model, {"content": item[1]}))
            elif item[0] == "finish":
                yield event(chunk_body(completion_id, model, {}, finish_reason=item[1]))
                if include_usage:
                    yield event(
                        chunk_body(
                            completion_id, model, {}, usage=usage_body(job.prompt_tokens, item[2]), choices=False
                        )
                    )
                break
            else:
                yield event(as_api_error(item[1]).body())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()
