"""From examples to tensors: token ids with their labels, pixel values, batches.

The sequence BLIP-2 sees for one example is::

    <image> × num_query_tokens   </s>   prompt tokens   target tokens   stop
    └──────── label -100 ──────┘ └──────── -100 ───────┘ └──── learned ─────┘

The image placeholders are replaced by the Q-Former's output inside the
model; the loss counts only the target and the stop token (for BLIP-2 OPT,
"\\n"), so the adapter learns to say the caption *and to stop*. Padding is on
the right and labelled -100; the attention mask is passed.

Text is tokenized once, when the data set is built; images are decoded and
resized once per epoch, a batch at a time (``__getitems__``: one image-processor
call per batch, not one per image), in DataLoader workers when ``num_workers > 0``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from multimodal_lora.data.images import load_image
from multimodal_lora.data.sources import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TextLayout:
    """How a base model's tokens frame an example; read from the base, not hard-coded."""

    image_token_id: int
    num_query_tokens: int
    bos_token_id: int
    pad_token_id: int
    stop_token_id: int


def prompt_text(task: str, question: str | None, prompt: str | None, prompt_template: str) -> str:
    """The text before the target: a caption prefix, or the VQA question in its template."""
    if task == "vqa":
        return prompt_template.format(question=question)
    return prompt or ""


class ExampleEncoder:
    """Tokenizes examples into ``input_ids`` and ``labels`` (as Python lists)."""

    def __init__(self, tokenizer, layout: TextLayout, *, task: str, prompt: str | None, prompt_template: str, max_length: int):
        self.tokenizer = tokenizer
        self.layout = layout
        self.task = task
        self.prompt = prompt
        self.prompt_template = prompt_template
        self.max_length = max_length
        self.truncated = 0

    def prompt_ids(self, question: str | None = None) -> list[int]:
        """``</s>`` + the prompt's tokens: what generation starts from (after the image)."""
        text = prompt_text(self.task, question, self.prompt, self.prompt_template)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids if text else []
        return [self.layout.bos_token_id, *ids]

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        prompt = self.prompt_ids(example.question)
        # A target that follows a prompt is a new word: give it its leading space.
        target_text = example.target.strip()
        if len(prompt) > 1:
            target_text = " " + target_text
        target = self.tokenizer(target_text, add_special_tokens=False).input_ids
        room = self.max_length - len(prompt) - 1
        if len(target) > room:
            self.truncated += 1
            target = target[: max(room, 0)]
        text = prompt + target + [self.layout.stop_token_id]
        image = [self.layout.image_token_id] * self.layout.num_query_tokens
        labels = [IGNORE_INDEX] * (len(image) + len(prompt)) + target + [self.layout.stop_token_id]
        return image + text, labels

    def encode_all(self, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
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

    def __init__(self, examples: list[Example], encoded: list[tuple[list[int], list[int]]], image_processor):
        assert len(examples) == len(encoded)
        self.examples = examples
        self.encoded = encoded
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch of items; the DataLoader calls this instead of ``__getitem__`` per index.

        Resizing and normalising the batch in one image-processor call saves the
        processor's fixed cost per call, which dominates for small images.
        """
        images = [_load(self.examples[i]) for i in indices]
        pixel_values = self.image_processor(images, return_tensors="pt").pixel_values
        return [
            {"pixel_values": pixels, "input_ids": self.encoded[i][0], "labels": self.encoded[i][1]}
            for i, pixels in zip(indices, pixel_values)
        ]


def _load(example: Example):
    return load_image(example.image, name=None if isinstance(example.image, str) else example.origin)


@dataclass(frozen=True)
class Collator:
    """Pads a list of items on the right into one batch."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        # One tensor per field for the whole batch, scattered through the padding mask:
        # a torch.tensor call per row cost 1.7% of a tiny-model step.
        lengths = torch.tensor([len(item["input_ids"]) for item in items])
        length = int(lengths.max())
        mask = torch.arange(length) < lengths[:, None]
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        input_ids[mask] = torch.tensor([t for item in items for t in item["input_ids"]], dtype=torch.long)
        labels[mask] = torch.tensor([t for item in items for t in item["labels"]], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": mask.long(), "labels": labels}
        if "pixel_values" in items[0]:
            batch["pixel_values"] = torch.stack([item["pixel_values"] for item in items])
        return batch
