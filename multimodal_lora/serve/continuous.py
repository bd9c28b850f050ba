"""Iteration-level ("continuous") batching: requests join and leave a running batch between tokens.

With per-request batching (:class:`~multimodal_lora.serve.batcher.Batcher` and
:func:`~multimodal_lora.serve.engine.run_batch`), a request that arrives while
a batch is generating waits for all of it, then for its own. On a GPU, where a
batch of 16 costs about what one request does, that wait is most of a
request's latency: at 16 clients on an H100, p95 came to 2.2–2.8× one request
alone. Here one decode loop runs the language model a token at a time over
every running row, and between two tokens

* rows that are done (stop token, ``stop`` string, ``max_tokens``, client
  gone) leave the batch, and
* waiting requests for the same adapter and sampling settings join it: their
  image path and prompt run in one forward (the "prefill"), and their
  key/value cache is appended to the running one.

So a request waits at most one token's time to start, not a whole batch.

The rows stay right-aligned, as in a left-padded ``generate`` batch: the cache
has one column per position, a row that joined with a shorter history has
masked, zero columns on its left, and each row's next position is the number of
positions it holds plus an offset its prefill gave it. What a family's model
needs for a prefill and a step (its positions, masks, head) comes from the
family (:attr:`Family.decoding`, :mod:`multimodal_lora.families.decoding`);
this module knows no architecture. Every row therefore computes what its own
``generate`` call computes, and greedy text equals :meth:`Captioner.caption`
and :meth:`~multimodal_lora.inference.captioner.Captioner.ask` (the tests check it on
requests that join mid-way, for every family that decodes here).

This needs a decoder-only language model with a plain key/value cache (BLIP-2
OPT, InstructBLIP Vicuna, Qwen2.5-VL, PaliGemma, SmolVLM), and a generation
config that only chooses tokens or applies a repetition penalty (the published
Qwen2.5-VL configs set one; no n-gram bans and the like, which the loop does not
apply); :func:`continuous_problem` says why a base does not
qualify, and the server then batches per ``generate`` call instead.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from multimodal_lora.families.layouts import DecoderOnlyLayout
from multimodal_lora.serve.batcher import Batcher, together_or_alone
from multimodal_lora.serve.engine import Job, Row, run_batch

logger = logging.getLogger(__name__)

# Generation-config settings that change the logits (name: the value that leaves them alone). The loop
# here applies the repetition penalty (the published Qwen2.5-VL configs set 1.05), temperature, top-k and
# top-p; a base whose config asks for more is batched per call.
_NEUTRAL = {
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False),
    "typical_p": (None, 1.0),
    "min_p": (None, 0.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
}


def continuous_problem(captioner) -> str | None:
    """Why ``captioner``'s model cannot decode in a continuous batch, or ``None`` when it can."""
    family = captioner.family
    if family.no_continuous_batching is not None:
        return family.no_continuous_batching
    if not isinstance(captioner.layout, DecoderOnlyLayout):
        return "its language model is an encoder–decoder (a T5): a row's decoder cache cannot join another's"
    if family.decoding is None:
        return f"the {family.name} family gives the decode loop no way to run its model (Family.decoding)"
    problem = family.decoding.problem(_model(captioner))
    if problem is not None:
        return problem
    config = captioner.model.generation_config
    changed = [name for name, neutral in _NEUTRAL.items() if getattr(config, name, None) not in neutral]
    if changed:
        return f"its generation config sets {', '.join(changed)}, which the decode loop does not apply"
    return None


def _model(captioner):
    """The family's model itself: a PEFT wrapper's base model (the LoRA layers are inside it)."""
    model = captioner.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class RunningBatch:
    """The rows decoding together (one adapter, one sampling setting), and their cache.

    Args:
        captioner: the loaded :class:`~multimodal_lora.inference.captioner.Captioner`.
        key: the rows' :attr:`Job.key` (adapter, sampling).
    """

    def __init__(self, captioner, key: tuple):
        self.captioner = captioner
        self.key = key
        self.adapter, self.sampling = key
        self.model = _model(captioner)
        self.decoding = captioner.family.decoding
        self.tokenizer = captioner.processor.tokenizer
        self.stop_ids = captioner.stop_token_ids
        self.warpers = _warpers(self.sampling, captioner.model.generation_config)
        penalty = getattr(captioner.model.generation_config, "repetition_penalty", None)
        self.penalty = None if penalty in (None, 1.0) else float(penalty)
        self.prompts: list[torch.Tensor] = []
        """Each row's prompt ids (padding left out), which the repetition penalty reads with its new tokens."""
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        """``(rows, columns)``: 1 where a row's cache column holds one of its positions."""
        self.next: torch.Tensor | None = None
        """``(rows,)``: each row's newest token, fed to the model at the next step."""
        self.offsets: torch.Tensor | None = None
        """``(rows,)``: what each row's next position adds to the positions it holds (see the families' decoding)."""

    @torch.no_grad()
    def admit(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` (their images and prompts, one forward), hand each its first token, and
        join them to the running rows. On failure the running rows are as they were."""
        batch = self.captioner.generation_inputs([job.image for job in jobs], [job.prompt for job in jobs])
        with self.captioner.running(self.adapter):
            prefill = self.decoding.prefill(self.model, batch, self.captioner.layout)
        prompts = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        tokens = self._choose(prefill.logits, lambda: [ids.tolist() for ids in prompts])
        rows = [Row(job, self.tokenizer, self.stop_ids) for job in jobs]
        self._join(prefill.cache, batch["attention_mask"], tokens, prefill.offsets, rows)
        self.prompts = self.prompts + prompts
        for row, token in zip(rows, tokens.tolist()):
            row.push(token)
        self._drop_finished()

    @torch.no_grad()
    def step(self) -> None:
        """One token for every running row; the rows that finish with it leave."""
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        with self.captioner.running(self.adapter):
            logits, cache = self.decoding.step(self.model, self.next, mask, self.offsets, self.cache)
        self.mask, self.cache = mask, cache
        self.next = self._choose(logits, lambda: [[*p.tolist(), *row.tokens] for p, row in zip(self.prompts, self.rows)])
        for row, token in zip(self.rows, self.next.tolist()):
            row.push(token)
        self._drop_finished()

    def _choose(self, logits: torch.Tensor, seen) -> torch.Tensor:
        """The next token of each row, as ``generate`` chooses it (in float32, the repetition penalty
        over the ids each row has seen, its prompt and its new tokens, listed by ``seen()``, then
        greedy or sampled)."""
        scores = logits.float()
        if self.penalty is not None:
            from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

            penalize = RepetitionPenaltyLogitsProcessor(self.penalty)
            # Row by row: each row's own ids, with no padding (generate leaves a row's padding out too).
            scores = torch.cat([penalize(torch.tensor([ids], device=scores.device), scores[i : i + 1]) for i, ids in enumerate(seen())])
        if not self.sampling.do_sample:
            return scores.argmax(dim=-1)
        scores = self.warpers(None, scores)
        return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    def _join(self, cache, mask: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor, rows: list[Row]) -> None:
        if not self.rows:
            self.cache, self.mask, self.next, self.offsets, self.rows = cache, mask, tokens, offsets, rows
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
        self.next = torch.cat([self.next, tokens])
        self.offsets = torch.cat([self.offsets, offsets.to(self.offsets)])
        self.rows = self.rows + rows

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.prompts = [self.prompts[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.next = self.offsets = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.next, self.offsets = self.mask[index], self.next[index], self.offsets[index]
        # The columns no remaining row uses (the history of rows that left) go too: the cache is
        # never wider than its longest row.
        first = int(self.mask.any(dim=0).int().argmax())
        self.mask = self.mask[:, first:]
        for layer in _layers(self.cache):
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]


class ContinuousBatcher(Batcher):
    """A :class:`~multimodal_lora.serve.batcher.Batcher` whose worker decodes continuously.

    When nothing runs, the oldest waiting request starts a batch with its mates,
    gathered as the plain batcher gathers them. While a batch runs, waiting
    requests of its adapter and sampling settings join it between two tokens, up
    to ``max_batch_size`` rows, unless a request of another kind waits ahead of
    them: then the batch takes no one new and drains, so that kind goes next and
    none starves.

    A failing prefill is retried request by request, so only a request that fails
    alone gets the error; a failing step fails the rows that had sent text (they
    cannot be repeated) and answers the others with a ``generate`` call each.

    Counters, besides the batcher's (``batches`` counts prefills here,
    ``batched_jobs`` the requests they took): ``steps`` (decoding forwards),
    ``step_rows`` (rows over those steps: ``step_rows / steps`` is the batch's
    mean occupancy), ``joined`` (requests that joined a batch already decoding), and
    moving averages of a prefill's and a step's time.
    """

    mode = "continuous"

    def __init__(self, captioner, *, max_batch_size: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256):
        problem = continuous_problem(captioner)
        if problem is not None:
            raise ValueError(f"this base cannot decode in a continuous batch: {problem}")
        self.captioner = captioner
        self.steps = 0
        self.step_rows = 0
        self.joined = 0
        self._prefill_seconds = 0.0  # a moving average of the prefills' time (see _worth_a_prefill)
        self._step_seconds = 0.0  # and of the decoding steps' (for /health)
        super().__init__(
            lambda jobs: run_batch(captioner, jobs),
            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
        )  # fmt: skip

    def counters(self) -> dict:
        return {
            **super().counters(),
            "decode_steps": self.steps,
            "decoded_rows": self.step_rows,
            "joined_running": self.joined,
            "prefill_ms": round(self._prefill_seconds * 1000, 2),
            "step_ms": round(self._step_seconds * 1000, 2),
        }

    def _loop(self) -> None:
        running: RunningBatch | None = None
        while True:
            if running is None or not running.rows:
                jobs = self._next_batch()
                if jobs is None:
                    return
                if not jobs:
                    continue
                running = RunningBatch(self.captioner, jobs[0].key)
            else:
                jobs = self._joiners(running.key, self.max_batch_size - len(running.rows), len(running.rows))
                self.joined += len(jobs)
            if jobs:
                self._admit(running, jobs)
            if running.rows and not self._step(running):
                running = None

    def _joiners(self, key: tuple, room: int, running: int) -> list[Job]:
        """Waiting requests that join the running batch now (see the class docstring), or none yet."""
        with self._cond:
            take: list[Job] = []
            rest: list[Job] = []
            blocked = False  # an older request of another kind waits: nothing behind it may join
            more = False  # a request that could join found no room: the server is saturated
            for job in self._waiting:
                if job.key == key and job.cancelled.is_set():
                    continue  # the client went away while it waited
                if job.key == key and not blocked and len(take) < room:
                    take.append(job)
                else:
                    more = more or (job.key == key and not blocked)
                    blocked = blocked or job.key != key
                    rest.append(job)
            self._waiting = [*take, *rest]
            if not take or not self._worth_a_prefill(take, running, more):
                return []
            self._waiting = rest
            return take

    def _worth_a_prefill(self, joiners: list[Job], running: int, more: bool) -> bool:
        """Whether to hold up the running rows for a prefill now.

        A prefill holds up every running row for as long as it takes, and on a GPU a
        prefill of one request costs about what a prefill of sixteen does. So joiners
        are let in once the time they have waited, all together, is at least that
        hold-up (running rows × the recent prefills' time): a lone request soon, a
        group of them sooner. When more are waiting than the batch has room for (a
        saturated server), they go in groups of at least half the batch, not
        one or two as rows finish: prefilling at every step would spend the batch's
        time on prefills. Per-request batching is the other extreme: it waits for the
        whole batch to finish.
        """
        if more and len(joiners) < max(1, self.max_batch_size // 2):
            return False
        now = time.monotonic()
        waited = sum(now - job.arrived for job in joiners)
        return waited >= running * self._prefill_seconds

    def _admit(self, running: RunningBatch, jobs: list[Job]) -> None:
        self.batches += 1
        self.batched_jobs += len(jobs)

        def prefill(group: list[Job]) -> None:
            start = time.perf_counter()
            running.admit(group)
            self._prefill_seconds = 0.7 * self._prefill_seconds + 0.3 * (time.perf_counter() - start)

        def each(group: list[Job]) -> None:
            for job in group:
                try:
                    prefill([job])
                except Exception as exc:
                    logger.exception("generation failed")
                    job.sink.fail(exc)

        together_or_alone(jobs, prefill, each, "a prefill", "admitting its requests")

    def _step(self, running: RunningBatch) -> bool:
        """One decoding step; ``False`` when it failed (its rows were answered otherwise)."""
        self.steps += 1
        self.step_rows += len(running.rows)
        start = time.perf_counter()
        try:
            running.step()
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - start)
            return True
        except Exception as exc:
            open_jobs = [row.job for row in running.rows if not row.finished]
            logger.warning(
                "a decoding step of %d requests failed (%s: %s); answering them one by one",
                len(open_jobs), type(exc).__name__, exc,
            )  # fmt: skip
            self._retry_alone(open_jobs)
            return False


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros before it along ``dim`` (-1 or -2) up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    return F.pad(tensor, (missing, 0) if dim == -1 else (0, 0, missing, 0))


def _layers(cache) -> list:
    """The per-layer key/value tensors of a ``DynamicCache``; anything else is refused by name."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise TypeError(
            f"continuous batching joins plain DynamicCache layers; this model's cache holds {', '.join(kinds)}"
        )
    return layers


def _warpers(sampling, generation_config):
    """Temperature, top-k and top-p as ``generate`` applies them when sampling (top-k from the
    base's generation config, 50 unless it says otherwise, as in ``caption(do_sample=True)``)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if not sampling.do_sample:
        return warpers
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    top_k = getattr(generation_config, "top_k", None)
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers
