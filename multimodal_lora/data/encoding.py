"""From examples to tensors: token ids with their labels, pixel values, batches.

Where the image, the prompt and the target go, and which tokens are learned,
is the base's token layout (:mod:`multimodal_lora.families.layouts`), the one
also used to generate: this module only walks the examples through it, warns
once about truncated targets, and pads batches as the layout says (labels with
-100; right padding with an attention mask).

Text is tokenized once, when the data set is built; images are decoded and
resized in ``__getitem__``, i.e. once per epoch, in DataLoader workers when
``num_workers > 0``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from multimodal_lora.data.images import load_image
from multimodal_lora.data.sources import Example
from multimodal_lora.families.layouts import IGNORE_INDEX, Padding

logger = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "Collator", "ExampleEncoder", "PairDataset", "prompt_text"]

Encoded = dict[str, list[int]]
"""One example's token lists: ``input_ids``, ``labels`` and whatever else the layout adds."""


def prompt_text(task: str, question: str | None, prompt: str | None, prompt_template: str) -> str:
    """The text before the target: a caption prefix, or the VQA question in its template."""
    if task == "vqa":
        return prompt_template.format(question=question)
    return prompt or ""


class ExampleEncoder:
    """Tokenizes examples through the base's token layout into ``{"input_ids", "labels", ...}`` lists."""

    def __init__(self, tokenizer, layout, *, task: str, prompt: str | None, prompt_template: str, max_length: int):
        self.tokenizer = tokenizer
        self.layout = layout
        self.task = task
        self.prompt = prompt
        self.prompt_template = prompt_template
        self.max_length = max_length
        self.truncated = 0

    def prompt_of(self, example: Example) -> str:
        """The text before the target for this example (also the InstructBLIP Q-Former's instruction)."""
        return prompt_text(self.task, example.question, self.prompt, self.prompt_template)

    def encode(self, example: Example) -> Encoded:
        encoded, truncated = self.layout.encode(self.tokenizer, self.prompt_of(example), example.target, self.max_length)
        self.truncated += truncated
        return encoded

    def encode_all(self, examples: list[Example]) -> list[Encoded]:
        self.truncated = 0
        encoded = [self.encode(e) for e in examples]
        if self.truncated:
            warnings.warn(
                f"{self.truncated} of {len(examples)} targets were longer than data.max_length="
                f"{self.max_length} tokens and were truncated; raise data.max_length to keep them whole",
                stacklevel=2,
            )
        return encoded


class PairDataset(torch.utils.data.Dataset):
    """Examples with their tokens; images are decoded and resized on access."""

    def __init__(self, examples: list[Example], encoded: list[Encoded], image_processor):
        assert len(examples) == len(encoded)
        self.examples = examples
        self.encoded = encoded
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        image = load_image(example.image, name=None if isinstance(example.image, str) else example.origin)
        pixel_values = self.image_processor(image, return_tensors="pt").pixel_values[0]
        return {"pixel_values": pixel_values, **self.encoded[index]}


@dataclass(frozen=True)
class Collator:
    """Pads a list of items on the right into one batch, each key as the layout says.

    Args:
        pad_token_id: pads ``input_ids`` (and ``labels`` get -100) when ``padding`` is not given.
        padding: the layout's :meth:`~multimodal_lora.families.layouts.TokenLayout.padding`.
    """

    pad_token_id: int = 0
    padding: tuple[Padding, ...] | None = None

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        padding = self.padding or (Padding("input_ids", self.pad_token_id, "attention_mask"), Padding("labels", IGNORE_INDEX))
        batch = {}
        for pad in padding:
            rows = [item[pad.key] for item in items]
            length = max(map(len, rows))
            values = torch.full((len(rows), length), pad.value, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for row, ids in enumerate(rows):
                values[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            batch[pad.key] = values
            if pad.mask is not None:
                batch[pad.mask] = mask
        if "pixel_values" in items[0]:
            batch["pixel_values"] = torch.stack([item["pixel_values"] for item in items])
        return batch
