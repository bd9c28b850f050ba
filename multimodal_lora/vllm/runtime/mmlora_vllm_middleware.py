"""ASGI middleware for ``vllm serve --middleware mmlora_vllm_middleware.Middleware``: chat answers
as ``caption()`` and ``ask()`` give them. Runs in vLLM's interpreter: stdlib only.

Two things vLLM's chat endpoint does not do by itself:

* **The prompt depends on the model.** A caption adapter continues its training
  prompt, a VQA adapter puts the question in its template, but vLLM renders one
  chat template for every model and does not tell it which was asked for. This
  adds ``chat_template_kwargs.mmlora_model`` (the request's ``model``) to each
  chat request, and the chat template the project writes picks the layout by it.
* **Answers are stripped.** ``caption()`` strips what it decodes (BLIP-2 OPT's
  answers after a prompt start with a space); vLLM returns the text as decoded.
  Plain answers are stripped; a stream has its leading whitespace dropped and
  trailing whitespace held back until more text follows, so the streamed
  pieces join to the stripped answer (as the built-in server streams).
* **It stops where ``caption()`` stops:** on the family's stop token only
  (``$MMLORA_VLLM_STOP_TOKEN_IDS``, e.g. BLIP-2 OPT's "\n"), not also on the
  tokenizer's end-of-sequence token, which vLLM adds by itself. A request that
  sets ``stop_token_ids`` or ``ignore_eos`` keeps its own.
* **The built-in server's request limits** (``serve --max-body-bytes``,
  ``--max-image-bytes`` for ``data:`` URLs, and its remote-image policy: no
  http(s) image URL is fetched unless ``--allow-remote-images`` names the hosts),
  which vLLM does not have in this form: refused with the built-in server's
  status and message (``$MMLORA_VLLM_MAX_BODY_BYTES``,
  ``$MMLORA_VLLM_MAX_IMAGE_BYTES``, ``$MMLORA_VLLM_REFUSE_REMOTE_IMAGES``). vLLM applies
  the pixel limit (``VLLM_MAX_IMAGE_PIXELS``) and the allowed hosts
  (``--allowed-media-domains``) itself.
"""

from __future__ import annotations

import json
import os

CHAT_PATH = "/v1/chat/completions"
MODEL_KWARG = "mmlora_model"
STOP_ENV = "MMLORA_VLLM_STOP_TOKEN_IDS"
STOP_TOKEN_IDS = [int(t) for t in os.environ.get(STOP_ENV, "").split(",") if t.strip()]
MAX_BODY_BYTES = int(os.environ.get("MMLORA_VLLM_MAX_BODY_BYTES", "0")) or None
MAX_IMAGE_BYTES = int(os.environ.get("MMLORA_VLLM_MAX_IMAGE_BYTES", "0")) or None
REFUSE_REMOTE = os.environ.get("MMLORA_VLLM_REFUSE_REMOTE_IMAGES") == "1"
"""No http(s) image URL goes to vLLM (the built-in server's default); else vLLM's ``--allowed-media-domains`` decides."""


class Middleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            await _refuse(send, 413, f"the request body is larger than this server's limit ({MAX_BODY_BYTES} bytes)")
            return
        try:
            request = json.loads(body)
        except ValueError:
            request = None  # vLLM answers a body that is not JSON with its own 400
        if isinstance(request, dict):
            refusal = _image_refusal(request)
            if refusal is not None:
                await _refuse(send, *refusal)
                return
            body, scope = _with_model_kwarg(request, scope)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # after the body: the disconnect, when the client goes away
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, _StrippingSend(send))


async def _read_body(receive) -> bytes | None:
    """The request's body; ``None`` once it passes ``MAX_BODY_BYTES`` (the rest is not read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if MAX_BODY_BYTES is not None and size > MAX_BODY_BYTES:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def _image_urls(request) -> list[str]:
    urls = []
    for message in request.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            image = part.get("image_url") if isinstance(part, dict) else None
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                urls.append(url)
    return urls


def _image_refusal(request: dict):
    """``(status, message)`` for an image the built-in server would refuse; ``None`` if none is."""
    for url in _image_urls(request):
        if url.startswith("data:") and MAX_IMAGE_BYTES is not None:
            encoded = len(url) - url.find(",") - 1
            if encoded * 3 // 4 > MAX_IMAGE_BYTES:
                return 413, f"image_url: the image is larger than this server's limit ({MAX_IMAGE_BYTES} bytes)"
        scheme = url.split(":", 1)[0].lower()
        if scheme in ("http", "https") and REFUSE_REMOTE:
            return 403, (
                "image_url: remote image URLs are not fetched by this server; send the image as a data: URL "
                "(or start the server with --allow-remote-images --allowed-hosts HOST)"
            )
    return None


async def _refuse(send, status: int, message: str) -> None:
    """An OpenAI-style error, as the built-in server sends it."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": "messages", "code": None}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _with_model_kwarg(request: dict, scope):
    kwargs = request.get("chat_template_kwargs")
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    kwargs[MODEL_KWARG] = request.get("model")
    request["chat_template_kwargs"] = kwargs
    if STOP_TOKEN_IDS and "stop_token_ids" not in request and "ignore_eos" not in request:
        request["ignore_eos"], request["stop_token_ids"] = True, STOP_TOKEN_IDS
    body = json.dumps(request).encode()
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    return body, {**scope, "headers": headers}


class _StrippingSend:
    """Wraps ``send``: strips the answer of a JSON response, or of each choice of an event stream."""

    def __init__(self, send):
        self.send = send
        self.kind = None  # "json", "stream" or None (passed through)
        self.start = None
        self.buffer = b""
        self.started = {}  # choice index -> whether non-blank text was sent
        self.held = {}  # choice index -> trailing whitespace not sent yet

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            headers = dict((k.lower(), v) for k, v in message.get("headers", []))
            kind = headers.get(b"content-type", b"").split(b";")[0].strip()
            if message.get("status") == 200 and kind == b"application/json":
                self.kind, self.start = "json", message  # sent once the body is whole (its length changes)
                return
            if message.get("status") == 200 and kind == b"text/event-stream":
                self.kind = "stream"
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.kind is None:
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.kind == "json":
            if more:
                return
            body = _strip_completion(self.buffer)
            headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await self.send({**self.start, "headers": headers})
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
            return
        out = []
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            out.append(self._event(event) + b"\n\n")
        if not more and self.buffer:
            out.append(self.buffer)
            self.buffer = b""
        await self.send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        try:
            chunk = json.loads(event[len(b"data: ") :])
        except ValueError:
            return event
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            index = choice.get("index", 0)
            if isinstance(text, str) and text:
                if not self.started.get(index):
                    text = text.lstrip()
                    self.started[index] = bool(text)
                text = self.held.pop(index, "") + text
                kept = text.rstrip()
                if kept != text:
                    self.held[index] = text[len(kept) :]
                delta["content"] = kept
            if choice.get("finish_reason") is not None:
                self.held.pop(index, None)  # the final answer is stripped: trailing whitespace never goes out
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode()


def _strip_completion(body: bytes) -> bytes:
    try:
        completion = json.loads(body)
    except ValueError:
        return body
    for choice in completion.get("choices") or []:
        message = choice.get("message") or {}
        if isinstance(message.get("content"), str):
            message["content"] = message["content"].strip()
    return json.dumps(completion, ensure_ascii=False).encode()
