"""Running one batch: a ``generate`` call for many requests, each row followed token by token.

A :class:`Job` is one request, already validated and with its image decoded.
:func:`run_batch` answers a list of jobs that share an adapter and sampling
settings with one :meth:`~multimodal_lora.inference.captioner.Captioner.generate_batch`
call. A streamer sees every step's tokens and hands each row's text to its job
as it grows; a row is done at the stop token, at one of its ``stop`` strings or
at its own ``max_tokens``, and a stopping criterion tells ``generate`` so, so a
batch ends when its last row does.

Each row's text is exactly what :meth:`Captioner.caption` / :meth:`ask` return
for it alone: greedy decoding of a left-padded batch gives every row the tokens
it gets by itself, and the text is decoded and stripped the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from multimodal_lora.serve.protocol import Sampling

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"


class Sink(Protocol):
    """Where a job's results go (the HTTP handler waiting for it)."""

    def delta(self, text: str) -> None: ...
    def finish(self, finish_reason: str, completion_tokens: int) -> None: ...
    def fail(self, error: BaseException) -> None: ...


@dataclass
class Job:
    """One request, validated and decoded, waiting for a batch."""

    adapter: str | None
    image: object
    prompt: str
    prompt_tokens: int
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    sink: Sink
    stream: bool = True
    """Whether the text is sent as it grows; an answer sent whole with no ``stop`` strings is decoded once, at the end."""
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started_output: bool = False
    """Set once any text went to the sink: such a job cannot be retried without repeating itself."""
    done: bool = False

    @property
    def key(self) -> tuple:
        """Jobs with equal keys may share a ``generate`` call (same adapter, same sampling)."""
        return (self.adapter, self.sampling)


class Row:
    """One job's tokens, the text it has been sent, and whether it is finished."""

    def __init__(self, job: Job, tokenizer, stop_ids: set[int]):
        self.job = job
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.tokens: list[int] = []
        self.sent = ""
        self.finish_reason: str | None = None
        self.count = 0  # generated tokens, the stop token included (what usage reports)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.job.cancelled.is_set()

    def push(self, token: int) -> None:
        if self.finished:
            return
        self.count += 1
        if token in self.stop_ids:
            self._finish("stop")
            return
        self.tokens.append(token)
        if not self.job.stream and not self.job.stop:  # nothing to look for in the text until it ends
            if len(self.tokens) >= self.job.max_tokens:
                self._finish("length")
            return
        text = self._text()
        cut = _first_stop(text, self.job.stop)
        if cut is not None:
            self._finish("stop", text[:cut])
            return
        if len(self.tokens) >= self.job.max_tokens:
            self._finish("length", text)
            return
        self._send(_safe_prefix(text, self.job.stop))

    def end(self) -> None:
        """``generate`` returned: a row still open ran out of tokens."""
        if not self.finished:
            self._finish("length", self._text())

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()

    def _send(self, prefix: str) -> None:
        if len(prefix) > len(self.sent) and prefix.startswith(self.sent):
            self.job.sink.delta(prefix[len(self.sent) :])
            self.job.started_output = True
            self.sent = prefix

    def _finish(self, reason: str, text: str | None = None) -> None:
        final = (self._text() if text is None else text).strip()
        if not final.startswith(self.sent):  # cannot happen with the prefixes sent above; say so if it does
            logger.warning("streamed text %r is not a prefix of the final text %r", self.sent, final)
        self._send(final)
        self.finish_reason = reason
        self.job.done = True
        self.job.sink.finish(reason, self.count)


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_prefix(text: str, stops: list[str]) -> str:
    """What may be streamed now: not trailing whitespace (the final text is stripped), not a
    half-decoded character, not the start of a stop string that the next token may complete."""
    end = len(text.rstrip())
    while end and text[end - 1] == REPLACEMENT:
        end -= 1
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:n]):
                end -= n
                break
    return text[:end].rstrip()


class _RowStreamer(BaseStreamer):
    """Receives each step's tokens (one per row) from ``generate``."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            row.push(int(token))

    def end(self) -> None:
        pass


class _RowsDone(StoppingCriteria):
    """Per row: done when its job is finished or cancelled (the client went away)."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([row.finished for row in self.rows], dtype=torch.bool, device=input_ids.device)


def run_batch(captioner, jobs: list[Job]) -> None:
    """Answer ``jobs`` (same adapter, same sampling) with one ``generate`` call.

    Every job's sink gets its deltas and then ``finish``; an exception from
    ``generate`` propagates to the caller (the batcher), which decides what the
    jobs get.
    """
    first = jobs[0]
    assert all(job.key == first.key for job in jobs), "a batch mixes adapters or sampling settings"
    stop_ids = captioner.stop_token_ids
    rows = [Row(job, captioner.processor.tokenizer, stop_ids) for job in jobs]
    captioner.generate_batch(
        [job.image for job in jobs],
        [job.prompt for job in jobs],
        first.adapter,
        max_new_tokens=max(job.max_tokens for job in jobs),
        do_sample=first.sampling.do_sample,
        temperature=first.sampling.temperature,
        top_p=first.sampling.top_p,
        streamer=_RowStreamer(rows),
        stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]),
    )
    for row in rows:
        row.end()
