"""Gathering concurrent requests into batches: one worker thread, one model.

Requests wait in one queue. The worker takes the oldest waiting request, waits
up to ``max_wait_ms`` after its arrival for more requests that may share its
``generate`` call (same adapter, same sampling settings; see
:attr:`~multimodal_lora.serve.engine.Job.key`), and runs up to
``max_batch_size`` of them together.

It waits only as long as it has reason to: once as many mates are there as
the last batch of that kind had, the batch goes. A lone client's request
therefore goes at once (the last batch was one request), while 16 clients
that came back together are answered together instead of in two halves. Requests for other adapters keep their
place in the queue, so no adapter starves and no batch runs with the wrong
adapter active.

A failing batch does not take its members down with it: every member that has
not yet sent anything is run again alone, so only the request that fails alone
gets the error. ``max_batch_size=1`` with ``max_wait_ms=0`` is one request at
a time (the ``--no-batching`` of the server, and the bench's baseline).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from multimodal_lora.serve.engine import Job
from multimodal_lora.serve.protocol import queue_full, unavailable

logger = logging.getLogger(__name__)

MAX_KINDS = 256  # adapter and sampling combinations whose last batch size is remembered


class Batcher:
    """A queue of :class:`Job`\\ s and the thread that answers them in batches.

    Args:
        run: answers a list of jobs with one ``generate`` call (raises on failure).
        max_batch_size: the most jobs in one call.
        max_wait_ms: how long the oldest job may wait for batch-mates.
        max_queue: jobs that may wait; one more is refused with a 503.
    """

    @property
    def mode(self) -> str:
        """How requests share the model, for ``/health``: ``request`` (a ``generate`` call per batch) or
        ``off`` (one at a time); :class:`~multimodal_lora.serve.continuous.ContinuousBatcher` says ``continuous``."""
        return "off" if self.max_batch_size == 1 else "request"

    def __init__(
        self,
        run: Callable[[list[Job]], None],
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
    ):
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1, max_wait_ms at least 0")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._waiting: list[Job] = []
        self._last_size: dict[tuple, int] = {}  # per Job.key: how many the last batch of that kind took
        self._cond = threading.Condition()
        self._stopping = False
        self.batches = 0
        """Batches run so far (one per ``generate`` call, retries included)."""
        self.batched_jobs = 0
        self._thread = threading.Thread(target=self._loop, name="multimodal-lora-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; its sink hears the result. Raises a 503 :class:`APIError` when the queue is full."""
        with self._cond:
            if self._stopping:
                raise unavailable("the server is shutting down", "shutting_down")
            if len(self._waiting) >= self.max_queue:  # the clients of some may have gone: they hold no place
                self._waiting = [waiting for waiting in self._waiting if not waiting.cancelled.is_set()]
            if len(self._waiting) >= self.max_queue:
                raise queue_full(len(self._waiting), self.max_queue, "waiting")
            self._waiting.append(job)
            self._cond.notify()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def counters(self) -> dict:
        """What ``/health`` reports: how requests are batched, how many wait, and how many
        ``generate`` calls (``batches``) answered how many requests (``batched_requests``)."""
        return {
            "batching": self.mode,
            "waiting": self.waiting,
            "batches": self.batches,
            "batched_requests": self.batched_jobs,
        }

    def close(self, timeout: float = 30) -> None:
        """Stop taking jobs; the worker finishes what is queued, then ends."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._waiting:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._waiting[0]
            deadline = first.arrived + self.max_wait
            expected = min(self._last_size.get(first.key, self.max_batch_size), self.max_batch_size)
            while True:
                mates = [job for job in self._waiting if job.key == first.key and not job.cancelled.is_set()]
                left = deadline - time.monotonic()
                if len(mates) >= expected or left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            batch = mates[: self.max_batch_size]
            if batch:
                # Full or timed out: next time expect what came; more than that and the load grew, so wait for all.
                self._last_size.pop(first.key, None)  # newest last, so the oldest kinds go first
                self._last_size[first.key] = self.max_batch_size if len(batch) > expected else len(batch)
                if len(self._last_size) > MAX_KINDS:  # clients choose sampling settings: keep this bounded
                    del self._last_size[next(iter(self._last_size))]
            # Cancelled jobs (the client went away) leave the queue without running.
            taken = {id(job) for job in batch}
            self._waiting = [
                job
                for job in self._waiting
                if id(job) not in taken and not (job.key == first.key and job.cancelled.is_set())
            ]
            if not batch:  # the oldest job was cancelled while waiting
                return []
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._answer(batch)

    def _answer(self, batch: list[Job]) -> None:
        together_or_alone(batch, self._run, self._retry_alone, "a batch", "running its requests")

    def _retry_alone(self, jobs: list[Job]) -> None:
        """Jobs whose batch failed: each runs alone, unless it had sent text (it would repeat itself)."""
        for job in jobs:
            if job.done or job.cancelled.is_set():
                continue
            if job.started_output:
                job.sink.fail(RuntimeError("generation failed after the answer had started; retry the request"))
                continue
            try:
                self._run([job])
            except Exception as exc:
                logger.exception("generation failed")
                job.sink.fail(exc)

    def _run(self, batch: list[Job]) -> None:
        self.batches += 1
        self.batched_jobs += len(batch)
        self.run(batch)


def together_or_alone(
    jobs: list[Job], together: Callable[[list[Job]], None], alone: Callable[[list[Job]], None], what: str, then: str
) -> None:
    """Run ``jobs`` with ``together``; if that fails, a lone job gets the error, and several go to
    ``alone`` (which runs them one by one, so only a job that fails by itself gets an error).
    ``what`` and ``then`` name the two for the log ("a batch", "running its requests")."""
    try:
        together(jobs)
        return
    except Exception as exc:
        if len(jobs) == 1:
            logger.exception("generation failed")
            jobs[0].sink.fail(exc)
            return
        logger.warning("%s of %d failed (%s: %s); %s one by one", what, len(jobs), type(exc).__name__, exc, then)
    alone(jobs)
