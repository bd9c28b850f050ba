"""Generation in its own process, so that the model's loop shares no interpreter with the HTTP side.

In one process, a batch's ``generate`` gave up the GIL in each of its many small
torch ops and had to win it back from the threads parsing requests and decoding
images: under load a batch took about 1.7× what it takes alone, and the server
was bound to one core (``bench/serve.py``). So the server runs two processes:

- the **HTTP process** (uvicorn) checks every request, decodes its image and
  prepares its pixels, with :meth:`~multimodal_lora.inference.captioner.Captioner.without_model`
  for the names, tasks, prompts and lengths;
- the **engine process** loads the base and the adapters and answers jobs with
  the same :class:`~multimodal_lora.serve.batcher.Batcher` and
  :func:`~multimodal_lora.serve.engine.run_batch` a single process would use.

They talk over one pipe. To the engine go jobs (pixels, prompt, settings),
cancellations (a client went away) and the end; back come each job's deltas,
then its finish or its error, with the batch counters that ``/health`` shows.
Messages back are sent in bundles by one thread, so ``generate`` never waits
on the pipe. :class:`EngineProcess` is the HTTP side's handle: it offers what
the app needs of a ``Batcher`` (``submit``, ``waiting``, ``batches``,
``batched_jobs``, ``close``).

If the engine process dies, every request waiting on it gets a 503 and the
server stops (``on_death``), so that a supervisor can restart it: a server that
accepts requests it can no longer answer is worse than one that is down.
"""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing
import signal
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from multimodal_lora.core.errors import ConfigError, UserError
from multimodal_lora.serve.protocol import APIError, as_api_error, queue_full, unavailable

if TYPE_CHECKING:  # the engine module imports torch and transformers: the engine process imports it itself
    from multimodal_lora.serve.engine import Job

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads and how it batches (all of it crosses to the new process)."""

    adapters_dir: str = "runs"
    """Searched for adapters, as the demo's ``--adapters-dir``."""
    explicit: dict[str, Path] = field(default_factory=dict)
    """``--adapter NAME=DIR``: also served, under these names."""
    base: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    torch_threads: int | None = None
    batching: str = "continuous"
    """``continuous`` (where the base allows it, else ``request``), ``request`` or ``off``."""
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256


# --- the HTTP process's side ------------------------------------------------------------------


class EngineProcess:
    """Starts the engine process and, once its model is loaded, carries jobs to it and answers back.

    Args:
        spec: what to load and how to batch.
        on_death: called (from a background thread) if the engine process ends while
            the server runs; the server uses it to stop.
    """

    def __init__(self, spec: EngineSpec, on_death: Callable[[], None] | None = None):
        # Spawned, not forked: a process forked from one with threads (or CUDA) may deadlock.
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_engine_main, args=(child, spec), name="multimodal-lora-engine", daemon=True)
        self._process.start()
        child.close()  # ours is the only other end: when the engine dies, recv() sees EOF
        self.max_queue = spec.max_queue
        self.on_death = on_death
        self.captioner = None
        """The model's :meth:`~Captioner.without_model` view (once :meth:`wait_ready` returned)."""
        self.problems: list[str] = []
        """Adapters that could not be loaded, and why."""
        self._counters = {"batching": spec.batching, "waiting": 0, "batches": 0, "batched_requests": 0}
        self.died = False
        self._death = ""
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the jobs, the pipe's sending side, and the closing flags
        self._closing = False
        self._reader: threading.Thread | None = None

    def wait_ready(self):
        """Wait until the model is loaded; returns its :meth:`~Captioner.without_model` view.

        Raises:
            ConfigError: loading failed for a reason the user can fix (the message says which).
            RuntimeError: the engine process failed otherwise (its log, above, has the traceback).
        """
        try:
            kind, *rest = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(
                f"the model's process exited with code {self._process.exitcode} while loading; its log is above"
            ) from None
        if kind == "error":
            user_error, message = rest
            self._process.join(5)
            raise (ConfigError if user_error else RuntimeError)(message)
        self.captioner, self.problems, self._counters = rest
        self._reader = threading.Thread(target=self._read, name="multimodal-lora-engine-reader", daemon=True)
        self._reader.start()
        return self.captioner

    def counters(self) -> dict:
        """The engine's batcher's :meth:`~multimodal_lora.serve.batcher.Batcher.counters`, as it last said."""
        return dict(self._counters)

    @property
    def waiting(self) -> int:
        """Requests waiting in the engine for the model, as it last said."""
        return self._counters["waiting"]

    def submit(self, job: Job) -> None:
        """Send ``job`` to the engine; its sink hears the result. Raises a 503 :class:`APIError`
        when ``max_queue`` requests are in the server already, or the engine has stopped."""
        with self._lock:
            if self.died:
                raise unavailable(self._death, "engine_stopped")
            if self._closing:
                raise unavailable("the server is shutting down", "shutting_down")
            if len(self._jobs) >= self.max_queue:
                raise queue_full(len(self._jobs), self.max_queue, "in it")
            job_id = next(self._ids)
            job.cancelled = _ForwardedCancel(self, job_id, job)
            self._jobs[job_id] = job
            # Pixels (Captioner.pixels: a dict of tensors) travel as numpy arrays: pickled by value. A torch tensor would go through
            # shared memory and a file-descriptor handshake, which costs more than these bytes.
            fields = dict(
                adapter=job.adapter, image={k: v.numpy() for k, v in job.image.items()}, prompt=job.prompt, prompt_tokens=job.prompt_tokens,
                max_tokens=job.max_tokens, sampling=job.sampling, stop=job.stop, stream=job.stream, arrived=job.arrived,
            )  # fmt: skip
            try:
                self._conn.send(("job", job_id, fields))
            except OSError:  # the engine died a moment ago; the reader has not seen the pipe close yet
                del self._jobs[job_id]
                raise unavailable("the model's process stopped; the server is restarting or down", "engine_stopped") from None

    def cancel(self, job_id: int) -> None:
        """The client went away: the engine drops the job, and its place here is free at once (a
        cancelled job gets no finish from the engine, so keeping it would fill the queue for good)."""
        with self._lock:
            if self._jobs.pop(job_id, None) is not None and not self.died and not self._closing:
                try:
                    self._conn.send(("cancel", job_id))
                except OSError:  # the engine is gone: there is nothing left to stop
                    pass

    def close(self, timeout: float = 30) -> None:
        """Stop taking jobs; the engine answers what it has, then ends (killed after ``timeout``)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if not self.died:
                try:
                    self._conn.send(("close",))
                except OSError:
                    pass
        self._process.join(timeout)
        if self._process.is_alive():
            logger.warning("the model's process did not end within %.0f s; killing it", timeout)
            self._process.kill()
            self._process.join(5)
        if self._reader is not None:
            self._reader.join(5)

    def _read(self) -> None:
        try:
            while True:
                for message in self._conn.recv():
                    self._dispatch(message)
        except (EOFError, OSError):
            pass
        self._ended()

    def _dispatch(self, message: tuple) -> None:
        kind, job_id = message[0], message[1]
        if kind == "delta":
            job = self._jobs.get(job_id)
            if job is not None:
                job.sink.delta(message[2])
            return
        # "finish" and "fail" carry the engine's counters as they were when the job ended.
        self._counters = message[-1]
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is None:
            return
        job.done = True
        if kind == "finish":
            job.sink.finish(message[2], message[3])
        else:
            job.sink.fail(message[2])

    def _ended(self) -> None:
        """The pipe closed: the engine ended (asked to, or not)."""
        self._process.join(5)
        self._death = f"the model's process stopped (exit code {self._process.exitcode}); the server is restarting or down"
        with self._lock:
            unexpected = not self._closing
            self.died = unexpected
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.done = True
            job.sink.fail(unavailable(self._death, "engine_stopped"))
        if unexpected:
            logger.error("%s; %d requests were failed with a 503", self._death, len(jobs))
            if self.on_death is not None:
                self.on_death()


class _ForwardedCancel(threading.Event):
    """A job's ``cancelled`` flag on the HTTP side: setting it also tells the engine, unless the job is done."""

    def __init__(self, engine: EngineProcess, job_id: int, job: Job):
        super().__init__()
        self._engine, self._job_id, self._job = engine, job_id, job

    def set(self) -> None:
        if self.is_set():
            return
        super().set()
        if not self._job.done:
            self._engine.cancel(self._job_id)


# --- the engine process's side ------------------------------------------------------------------


def _engine_main(conn, spec: EngineSpec) -> None:
    """The engine process: load, say so (or why not), then answer jobs until told to end or orphaned."""
    from multimodal_lora.core.log_setup import setup_logging

    # Ctrl-C in a terminal, and a supervisor stopping the service (systemd signals the whole group),
    # reach this process too. The HTTP process owns shutdown: it finishes its requests, then sends
    # "close" (or exits, and this process sees the pipe close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging()
    try:
        captioner, problems = _load(spec)
    except Exception as exc:
        if not isinstance(exc, UserError):
            logger.exception("loading the model failed")
        conn.send(("error", isinstance(exc, UserError), str(exc) or type(exc).__name__))
        return
    batcher = make_batcher(captioner, spec)
    conn.send(("ready", captioner.without_model(), problems, batcher.counters()))
    # The millions of objects that imports and the model made live as long as this process:
    # without this, every full collection walks them again, a pause of a second under load.
    gc.collect()
    gc.freeze()
    _serve(conn, batcher)


def _load(spec: EngineSpec):
    """The base and its adapters, and the adapters that could not be loaded."""
    import torch

    from multimodal_lora.adapter import collect_adapters
    from multimodal_lora.inference.captioner import Captioner

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    found = collect_adapters(spec.adapters_dir, spec.explicit)
    captioner = Captioner.for_adapters(
        found, spec.base, quantization=spec.quantization, dtype=spec.dtype, device=spec.device, purpose="the server"
    )
    return captioner, found.problems


def _serve(conn, batcher) -> None:
    import torch

    from multimodal_lora.serve.engine import Job

    outbox = _Outbox(conn)
    jobs: dict[int, Job] = {}

    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the HTTP process is gone: nobody is left to answer
                break
            if message[0] == "job":
                _, job_id, fields = message
                fields["image"] = {k: torch.from_numpy(v) for k, v in fields["image"].items()}
                job = Job(**fields, sink=_RemoteSink(job_id, outbox, jobs, batcher.counters))
                jobs[job_id] = job
                try:
                    batcher.submit(job)
                except APIError as exc:
                    job.sink.fail(exc)
            elif message[0] == "cancel":
                job = jobs.pop(message[1], None)
                if job is not None:
                    job.cancelled.set()
            elif message[0] == "close":
                break
    finally:
        batcher.close()
        outbox.close()


def make_batcher(captioner, spec: EngineSpec):
    """The batcher ``spec`` asks for: continuous where the base allows it (else per request, and the
    log says why), per ``generate`` call, or one request at a time."""
    from multimodal_lora.serve.batcher import Batcher
    from multimodal_lora.serve.continuous import ContinuousBatcher, continuous_problem
    from multimodal_lora.serve.engine import run_batch

    limits = dict(max_batch_size=spec.max_batch_size, max_wait_ms=spec.max_wait_ms, max_queue=spec.max_queue)
    if spec.batching == "continuous":
        problem = continuous_problem(captioner)
        if problem is None:
            return ContinuousBatcher(captioner, **limits)
        logger.info("continuous batching is not available for this base (%s); batching per generate call", problem)
    if spec.batching == "off":
        limits.update(max_batch_size=1, max_wait_ms=0.0)
    return Batcher(lambda batch: run_batch(captioner, batch), **limits)


class _RemoteSink:
    """A job's sink in the engine process: its results go into the outbox, for the HTTP process."""

    def __init__(self, job_id: int, outbox: _Outbox, jobs: dict[int, Job], counters: Callable[[], dict]):
        self.job_id, self.outbox, self.jobs, self.counters = job_id, outbox, jobs, counters

    def delta(self, text: str) -> None:
        self.outbox.put(("delta", self.job_id, text))

    def finish(self, finish_reason: str, completion_tokens: int) -> None:
        self.jobs.pop(self.job_id, None)
        self.outbox.put(("finish", self.job_id, finish_reason, completion_tokens, self.counters()))

    def fail(self, error: BaseException) -> None:
        self.jobs.pop(self.job_id, None)
        # The batcher has logged the traceback here; the client gets what as_api_error allows.
        self.outbox.put(("fail", self.job_id, as_api_error(error), self.counters()))


class _Outbox:
    """Messages for the HTTP process, sent by one thread: ``generate`` never waits on the pipe, and
    what one step of a batch produced (a delta per row) goes in one send."""

    def __init__(self, conn):
        self._conn = conn
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="multimodal-lora-outbox", daemon=True)
        self._thread.start()

    def put(self, item: tuple) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def close(self, timeout: float = 10) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                bundle = list(self._items)
                self._items.clear()
            try:
                self._conn.send(bundle)
            except OSError:  # the HTTP process is gone
                return
