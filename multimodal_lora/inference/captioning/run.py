"""Caption a stream of images on one process or many, in input order, resumably.

The input stream (:mod:`multimodal_lora.inference.captioning.inputs`) is cut into *rounds*
of ``batch_size × processes`` images; in each round process ``r`` captions
the ``r``-th batch. Every process lists the same stream (cheap: paths only)
and decodes only its own images, in DataLoader workers, so reading and
resizing the next batches overlaps generation. After each round the main
process gathers the rounds' rows (``gather_object``: they arrive in process
order, which is input order), writes them in one system call and updates the
progress bar, so the output is always a prefix of the input order. That is
what makes ``--resume`` simple: skip as many inputs as there are whole rows.

Launched with ``accelerate launch --num_processes N`` (GPUs, or CPUs over
gloo) the processes share the work; run plainly it is one process and the
same code.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class Result:
    """What a captioning job did (on the main process; other processes see zeros)."""

    written: int = 0
    """Rows written by this run (skipped ones not counted)."""
    skipped: int = 0
    """Inputs skipped because a previous run had written them (``--resume``)."""
    failed: int = 0
    """Rows with an ``error``."""
    errors: list[str] = field(default_factory=list)
    """The first error messages (at most :data:`MAX_ERRORS_KEPT`)."""
    seconds: float = 0.0


MAX_ERRORS_KEPT = 50


class ImageRounds(torch.utils.data.IterableDataset):
    """This process's batch of every round, decoded and resized, one item per round.

    Each item is a list of ``(position, path, image or error message)``; a
    round in which this process has no images still yields an empty list, so
    that every process takes part in every round's gather.

    Args:
        listing: returns a fresh iterator over all input paths (called once per worker).
        skip: inputs at the start that were already written.
        batch_size, rank, world: the round layout.
        size: ``(width, height)`` to resize to in the worker (the processor's input size), or ``None``.
    """

    def __init__(self, listing: Callable[[], Iterator[str]], skip: int, batch_size: int, rank: int, world: int, size):
        self.listing, self.skip, self.batch_size, self.rank, self.world, self.size = (
            listing,
            skip,
            batch_size,
            rank,
            world,
            size,
        )

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = enumerate(itertools.islice(self.listing(), self.skip, None), start=self.skip)
        for round_number, chunk in enumerate(_chunks(stream, self.batch_size * self.world)):
            # Workers take rounds in turn; the DataLoader hands them back in round order.
            if round_number % workers != worker:
                continue
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield [(position, path, self._decode(path)) for position, path in mine]

    def _decode(self, path: str):
        from PIL import Image

        from multimodal_lora.core.errors import ImageError
        from multimodal_lora.data.images import load_image

        try:
            image = load_image(path)
        except ImageError as exc:
            return str(exc)
        if self.size is not None and image.size != self.size:
            # The processor would resize to this anyway; doing it here keeps the main process for generation.
            image = image.resize(self.size, Image.Resampling.BICUBIC)
        return image


def caption_stream(
    generate: Callable[[list], list[str]],
    rounds: ImageRounds,
    *,
    total: int | None,
    write: Callable[[list[dict]], None],
    make_row: Callable[[str, str], dict],
    num_workers: int,
    state=None,
    progress: bool = True,
) -> Result:
    """Caption every round and hand the rows to ``write`` (main process), in input order.

    Args:
        generate: captions (or answers) for a list of PIL images.
        rounds: this process's share of the input.
        total: all inputs, for the progress bar's ETA (``None``: unknown).
        write: takes one round's rows on the main process.
        make_row: ``(path, text) -> row``.
        num_workers: DataLoader worker processes decoding ahead of generation.
        state: accelerate's ``PartialState`` when launched on several processes, else ``None``.
    """
    from tqdm import tqdm

    main = state is None or state.is_main_process
    result = Result(skipped=rounds.skip)
    loader = torch.utils.data.DataLoader(
        rounds, batch_size=None, collate_fn=_as_is, num_workers=num_workers, prefetch_factor=2 if num_workers else None
    )
    bar = tqdm(
        total=total, initial=rounds.skip, unit="image", desc="captioning", disable=not (progress and main),
        file=sys.stderr, mininterval=0.5, smoothing=0.1,
    )  # fmt: skip
    started = time.perf_counter()
    for batch in loader:
        rows = {}
        good = [(position, image) for position, _, image in batch if not isinstance(image, str)]
        if good:
            for (position, _), text in zip(good, generate([image for _, image in good])):
                rows[position] = text
        mine = [
            (position, path, rows.get(position), None if position in rows else image) for position, path, image in batch
        ]
        everyone = _gather(mine, state)
        if not main:
            continue
        out = []
        for _, path, text, error in sorted(everyone):
            row = make_row(path, text) if error is None else {"image": path, "error": error}
            out.append(row)
            if error is not None:
                result.failed += 1
                if len(result.errors) < MAX_ERRORS_KEPT:
                    result.errors.append(error)
        write(out)
        result.written += len(out)
        bar.update(len(out))
    bar.close()
    result.seconds = time.perf_counter() - started
    return result


def _gather(rows: list, state) -> list:
    if state is None or state.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return gather_object(rows)


def _as_is(item):
    return item


def _chunks(iterable, size: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
