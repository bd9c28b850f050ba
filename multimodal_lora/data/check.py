"""Check a recipe's data before a long run: ``python -m multimodal_lora.data check RECIPE``.

Reads the whole data set the recipe names, decodes every image once, and
tokenizes every target with the base's tokenizer (no model weights are
loaded), then prints: the source and how validation was chosen, images and
pairs per split, every bad example with its reason, target lengths in tokens
(min / median / p95 / max) and a suggested ``data.max_length``. The exit
status is 1 when training would refuse to start.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from multimodal_lora.config import Recipe
from multimodal_lora.core.errors import UserError
from multimodal_lora.data.encoding import IGNORE_INDEX, ExampleEncoder, prompt_text
from multimodal_lora.data.screen import scan
from multimodal_lora.data.sources import BadExample, Example, load_splits

logger = logging.getLogger(__name__)


@dataclass
class SplitCount:
    images: int
    pairs: int
    bad_pairs: int


@dataclass
class DataReport:
    """What :func:`check_data` found; :meth:`format` renders it, :attr:`fails` decides the exit status."""

    description: str
    held_out: str
    task: str
    counts: dict[str, SplitCount]
    bad: list[BadExample]
    on_bad_example: str
    max_length: int
    text_lengths: list[int] = field(default_factory=list)
    """Tokens per usable example: start token + prompt + target + stop token (what ``max_length`` limits)."""
    target_lengths: list[int] = field(default_factory=list)
    """Tokens of the target alone (the caption or the answer)."""
    tokenizer_problem: str | None = None
    text_limit: int | None = None
    """Text tokens the base holds after the image's query tokens (its position limit minus them)."""
    length_problems: list[str] = field(default_factory=list)
    """Lengths in the recipe the base cannot hold (training would refuse to start)."""
    image_tokens: list[int] = field(default_factory=list)
    """Positions each distinct usable image takes in the language model's sequence, as the base's
    processor makes it (:func:`image_token_counts`)."""
    image_sizes: int = 0
    """Distinct image sizes among them (one blank image of each was processed)."""

    @property
    def truncated(self) -> int:
        return sum(n > self.max_length for n in self.text_lengths)

    @property
    def suggested_max_length(self) -> int | None:
        """The longest example, rounded up to a multiple of 8 (no target truncated), within what the base holds."""
        if not self.text_lengths:
            return None
        suggested = max(8, math.ceil(max(self.text_lengths) / 8) * 8)
        return suggested if self.text_limit is None else min(suggested, self.text_limit)

    @property
    def failure(self) -> str | None:
        """Why training would not start, or ``None``."""
        if self.bad and self.on_bad_example == "error":
            return f"{len(self.bad)} bad examples and data.on_bad_example=error: training stops at the first"
        if self.counts["train"].pairs - self.counts["train"].bad_pairs == 0:
            return "no usable training examples"
        if self.length_problems:
            return "; ".join(self.length_problems)
        return None

    @property
    def fails(self) -> bool:
        return self.failure is not None

    def format(self) -> str:
        target = "caption" if self.task == "caption" else "answer"
        lines = [f"source: {self.description} (task {self.task})", f"validation: {self.held_out}", ""]
        lines.append(f"{'split':<12}{'images':>8}{'pairs':>8}{'bad':>6}")
        for name, count in self.counts.items():
            lines.append(f"{name:<12}{count.images:>8}{count.pairs:>8}{count.bad_pairs:>6}")
        lines.append("")
        if self.bad:
            action = "training stops at the first" if self.on_bad_example == "error" else "they are skipped"
            lines.append(f"bad examples: {len(self.bad)} (data.on_bad_example={self.on_bad_example}: {action})")
            lines += [f"  - [{b.split}] {b}" for b in self.bad]
        else:
            lines.append("bad examples: none")
        lines.append("")
        if self.tokenizer_problem:
            lines.append(f"token lengths: not measured ({self.tokenizer_problem})")
        elif self.text_lengths:
            lines.append(f"{target} tokens:            {_stats(self.target_lengths)}")
            lines.append(f"tokens per example:        {_stats(self.text_lengths)}  (start + prompt + {target} + stop)")
            fit = (
                f"truncates {self.truncated} of {len(self.text_lengths)} examples"
                if self.truncated
                else "fits every example"
            )
            lines.append(f"data.max_length={self.max_length}: {fit}")
            lines.append(f"suggested max_length: {self.suggested_max_length}")
            if self.image_tokens:
                lines.append(
                    f"image tokens per image:    {_stats(self.image_tokens)}  "
                    f"(the base's processor, {self.image_sizes} image size{'s' if self.image_sizes != 1 else ''})"
                )
            if self.text_limit is not None:
                longer = sum(n > self.text_limit for n in self.text_lengths)
                note = f"; {longer} examples are longer and are cut to it" if longer else ""
                lines.append(f"the base holds at most {self.text_limit} text tokens per example{note}")
        lines.append("")
        lines.append(f"FAIL: {self.failure}" if self.fails else "OK: training would start")
        return "\n".join(lines)


def check_data(recipe: Recipe, progress: bool = True) -> DataReport:
    """Read, decode and tokenize the data a recipe names, without loading model weights.

    Raises:
        DataError: the data set itself cannot be read (missing directory,
            metadata that is not UTF-8, a missing column).
    """
    cfg = recipe.data
    splits = load_splits(cfg)
    counts, bad, usable = {}, [], []
    for name in ("train", "validation"):
        examples: list[Example] = getattr(splits, name)
        found = scan(examples, name, progress=progress and len(examples) >= 1000)
        split_bad = [b for b in found if b is not None]
        counts[name] = SplitCount(len({e.image_id for e in examples}), len(examples), len(split_bad))
        bad += split_bad
        usable += [e for e, b in zip(examples, found) if b is None]
    report = DataReport(
        description=splits.description,
        held_out=splits.held_out,
        task=cfg.task,
        counts=counts,
        bad=bad,
        on_bad_example=cfg.on_bad_example,
        max_length=cfg.max_length,
    )
    try:
        family, config, processor, layout = _base_parts(recipe.model.base, recipe.model.revision)
    except (OSError, ValueError, UserError) as exc:
        report.tokenizer_problem = f"cannot load the tokenizer of {recipe.model.base!r}: {exc}"
        return report
    from multimodal_lora.model.base import Positions

    limit = None
    try:
        positions = Positions.of(family, config, getattr(processor, "image_processor", None))
        limit = positions.limit
        report.text_limit = positions.text
        report.length_problems = recipe_length_problems(recipe, processor.tokenizer, positions)
    except (UserError, OSError, AttributeError) as exc:
        logger.warning("the base's position limit could not be read (%s); lengths not checked against it", exc)
    # The trainer's own encoder and layout, with no length limit, counts exactly what it would feed.
    encoder = ExampleEncoder(
        processor.tokenizer, layout, task=cfg.task, prompt=cfg.prompt, prompt_template=cfg.prompt_template, max_length=10**9
    )
    report.image_tokens, report.image_sizes = image_token_counts(usable, processor, layout)
    if report.image_tokens and limit is not None:
        report.text_limit = limit - max(report.image_tokens)
    for example in usable:
        encoded = encoder.encode(example)
        report.text_lengths.append(layout.text_length(encoded))
        report.target_lengths.append(sum(label != IGNORE_INDEX for label in encoded["labels"]) - 1)  # minus the stop token
    return report


def image_token_counts(examples: list[Example], processor, layout) -> tuple[list[int], int]:
    """Positions each distinct image takes in the language model's sequence, and how many sizes there are.

    The count depends on the image's size alone (Qwen2.5-VL's patch grid, SmolVLM's tiles; fixed for
    the others), so each size is read from the image's header and one blank image of that size goes
    through the base's own image processor and the layout's image inputs: what training feeds.
    """
    from PIL import Image

    from multimodal_lora.data.images import image_size

    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return [], 0
    firsts = {e.image_id: e for e in examples}
    sizes = [image_size(e.image) for e in firsts.values()]
    tokens = {}
    for size in set(sizes):
        item = layout.image_inputs.split(image_processor([Image.new("RGB", size)], return_tensors="pt"))[0]
        count = layout.image_inputs.image_tokens(item)
        tokens[size] = layout.num_query_tokens if count is None else count
    return [tokens[size] for size in sizes], len(tokens)



def _base_parts(base: str, revision: str | None):
    """``(family, config, processor, token layout)`` of the base, from its name, config and processor (no weights)."""
    from multimodal_lora.model.base import base_config, base_family, load_processor

    family = base_family(base, revision)  # the command's one derivation of the family
    config = base_config(base, revision)
    processor = load_processor(base, revision, family=family)
    return family, config, processor, family.make_layout(config, None, processor)


def _stats(values: list[int]) -> str:
    ordered = sorted(values)

    def at(q: float) -> int:
        # Nearest-rank percentile: a value that occurs in the data.
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return f"min {ordered[0]} / median {at(0.5)} / p95 {at(0.95)} / max {ordered[-1]}"


def recipe_length_problems(recipe, tokenizer, positions=None) -> list[str]:
    """Every length in a recipe the base cannot hold: training examples, and the captions evaluation generates.

    ``positions`` (:class:`~multimodal_lora.model.base.Positions`) are the base's; when not given they are
    read from its config (no weights), so a recipe fails before the model loads.
    """
    from multimodal_lora.model.base import Positions, text_length_problem

    positions = positions or Positions.of_base(recipe.model.base, recipe.model.revision)
    problems = [p for p in [text_length_problem(recipe.data.max_length, positions)] if p]
    if recipe.train.eval_captions and positions.limit is not None:
        text = prompt_text(recipe.data.task, "", recipe.data.prompt, recipe.data.prompt_template)
        prompt = len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0
        limit, queries = positions.limit, positions.image
        needed = queries + 1 + prompt + recipe.train.eval_max_new_tokens - 1
        if needed > limit:
            problems.append(
                f"train.eval_max_new_tokens={recipe.train.eval_max_new_tokens}: after the {queries} image query tokens, "
                f"the start token and the {prompt}-token prompt that needs {needed} positions, but the base holds "
                f"{limit}; use at most train.eval_max_new_tokens={limit - queries - prompt}"
            )
    return problems
