"""The pre-scan: every example is checked before training, so a run never fails mid-way.

:func:`find_bad_examples` decodes every image once (each distinct image once,
however many captions it has) and checks every caption. What it finds is an
unreadable image (missing, empty, not an image, truncated, corrupt, a
decompression bomb) or an empty target (an all-masked example makes the loss
NaN). :func:`screen_examples` applies the recipe's ``data.on_bad_example``:
``error`` stops with the first bad example named, ``skip`` leaves them out and
records them in :attr:`Splits.bad`. ``python -m multimodal_lora.data check``
runs the same scan.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from multimodal_lora.config import DataConfig
from multimodal_lora.core.errors import DataError, ImageError
from multimodal_lora.data.images import load_image
from multimodal_lora.data.sources import BadExample, Example, Splits, with_examples

logger = logging.getLogger(__name__)

SHOWN = 5
"""How many bad examples a log line or an error message lists."""
CHUNK = 32
"""Images a screening task decodes in a row (see :func:`scan`)."""
PROBE = 8
"""Images decoded in the calling thread first, to time one (see :func:`scan`)."""
THREADS_FROM_SECONDS = 0.001
"""Images that take longer than this to decode are screened on several threads (see :func:`scan`)."""


class BadExampleError(DataError):
    """Bad examples were found and the recipe says ``on_bad_example: error``."""

    def __init__(self, message: str, bad: list[BadExample]):
        super().__init__(message)
        self.bad = bad


def image_label(example: Example) -> str:
    """How to name an example's image to a user: its path, or its row for in-memory bytes."""
    if not isinstance(example.image, str) or not example.image:
        return example.image_id
    return example.image


def image_problem(example: Example) -> str | None:
    """Why the example's image cannot be used, or ``None`` when it decodes."""
    if isinstance(example.image, str) and not example.image:
        return "no image named in this row"
    label = image_label(example)
    try:
        load_image(example.image, name=label)
    except ImageError as exc:
        return str(exc).removeprefix(f"{label}: ")
    return None


def text_problem(example: Example) -> str | None:
    """Why the example's text cannot be trained on, or ``None``."""
    if example.question is not None and not example.question.strip():
        return "empty question"
    if not example.target.strip():
        what = "answer" if example.question is not None else "caption"
        return f"empty {what} (nothing to learn; a fully masked example makes the loss NaN)"
    return None


def find_bad_examples(examples: list[Example], split: str, workers: int | None = None, progress: bool = False) -> list[BadExample]:
    """Decode every distinct image once and check every target; return what cannot be used."""
    return [b for b in scan(examples, split, workers, progress) if b is not None]


def scan(examples: list[Example], split: str, workers: int | None = None, progress: bool = False) -> list[BadExample | None]:
    """For each example, why it cannot be used (a :class:`BadExample`) or ``None``.

    Each distinct image is decoded once, in a thread pool (Pillow releases the
    GIL while decoding), and dropped right after, so memory holds a few images
    at a time whatever the size of the data set. The pool takes the images
    :data:`CHUNK` at a time: one task per image cost more than decoding a small
    one (2,000 64×64 PNGs: 1.2 s one by one through the pool, 0.35 s in a plain
    loop). And small images are decoded faster in one thread than in several,
    which would only pass the GIL back and forth: the first :data:`PROBE` are timed in
    this thread, and the pool is used only when an image takes over
    :data:`THREADS_FROM_SECONDS` (1024×768 JPEGs: 2.5× faster on 2 threads).
    """
    firsts: dict[str, Example] = {}
    for example in examples:
        firsts.setdefault(example.image_id, example)
    workers = workers or min(8, os.cpu_count() or 1)
    todo = list(firsts.values())
    # The first, short chunk is the one timed.
    chunks = [todo[:PROBE]] + [todo[i : i + CHUNK] for i in range(PROBE, len(todo), CHUNK)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"checking {split} images", unit="image", leave=False)

    def check(chunk: list[Example]) -> list[str | None]:
        problems = [image_problem(example) for example in chunk]
        if bar is not None:
            bar.update(len(chunk))
        return problems

    try:
        start = time.perf_counter()
        problems = check(chunks[0]) if chunks else []
        per_image = (time.perf_counter() - start) / max(len(problems), 1)
        if workers > 1 and per_image > THREADS_FROM_SECONDS:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                problems += [problem for chunk in pool.map(check, chunks[1:]) for problem in chunk]
        else:
            problems += [problem for chunk in chunks[1:] for problem in check(chunk)]
    finally:
        if bar is not None:
            bar.close()
    image_problems = dict(zip(firsts, problems))
    out: list[BadExample | None] = []
    for example in examples:
        reason = image_problems[example.image_id] or text_problem(example)
        out.append(None if reason is None else BadExample(split, example.origin, image_label(example), reason))
    return out


def screen_examples(splits: Splits, cfg: DataConfig, progress: bool = True) -> Splits:
    """Check every example before training and apply ``cfg.on_bad_example``.

    Returns:
        ``splits`` without the bad examples; they are listed in its ``bad``.

    Raises:
        BadExampleError: with ``on_bad_example: error``, naming the first bad
            file, its row and the reason, and how many more there are.
        DataError: nothing is left to train on.
    """
    show = progress and len(splits.train) + len(splits.validation) >= 1000
    kept, bad = {}, []
    for split in ("train", "validation"):
        examples = getattr(splits, split)
        found = scan(examples, split, progress=show)
        kept[split] = [e for e, b in zip(examples, found) if b is None]
        bad += [b for b in found if b is not None]
    if bad and cfg.on_bad_example == "error":
        more = f" (and {len(bad) - 1} more bad examples)" if len(bad) > 1 else ""
        raise BadExampleError(
            f"bad example: {bad[0]}{more}. Fix or remove it, or set data.on_bad_example=skip to train without it; "
            "`python -m multimodal_lora.data check RECIPE` lists every bad example.",
            bad,
        )
    if not kept["train"]:
        if bad:
            raise DataError(f"all {len(splits.train)} training examples are bad; the first: {bad[0]}")
        raise DataError(f"{splits.description}: no training examples; check data.path and data.train_split")
    return with_examples(splits, kept["train"], kept["validation"], bad=bad)


def describe_bad(bad: list[BadExample], shown: int = SHOWN) -> str:
    """``N bad examples skipped`` and the first few, one per line."""
    lines = [f"{len(bad)} bad example{'s' if len(bad) != 1 else ''} skipped (data.on_bad_example=skip):"]
    lines += [f"  - {b}" for b in bad[:shown]]
    if len(bad) > shown:
        lines.append(f"  ... and {len(bad) - shown} more (python -m multimodal_lora.data check RECIPE lists them all)")
    return "\n".join(lines)
