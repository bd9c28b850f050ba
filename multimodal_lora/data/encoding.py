"""From examples to tensors: token ids with their labels, pixel values, batches.

Where the image, the prompt and the target go, and which tokens are learned,
is the base's token layout (:mod:`multimodal_lora.families.layouts`), the one
also used to generate: this module only walks the examples through it, warns
once about truncated targets, and pads batches as the layout says (labels with
-100; right padding with an attention mask).

Text is tokenized once, when the data set is built; images are decoded and
resized once per epoch, a batch at a time (``__getitems__``: one image-processor
call per batch, not one per image), in DataLoader workers when ``num_workers > 0``.
What the processor returns becomes one item per image, and the item's image
tokens are put into the example's text there, as the layout's
:class:`~multimodal_lora.families.image_inputs.ImageInputs` says (a no-op for a
family whose image-token count is fixed).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from multimodal_lora.core.tasks import TASKS
from multimodal_lora.data.images import load_image
from multimodal_lora.data.sources import Example
from multimodal_lora.families.image_inputs import PIXELS, ImageInputs
from multimodal_lora.families.layouts import IGNORE_INDEX, Padding

logger = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "Collator", "ExampleEncoder", "PairDataset", "prompt_text"]

Encoded = dict[str, list[int]]
"""One example's token lists: ``input_ids``, ``labels`` and whatever else the layout adds."""


def prompt_text(task: str, question: str | None, prompt: str | None, prompt_template: str) -> str:
    """The text before the target: a caption prefix, or the VQA question in its template (:class:`~multimodal_lora.core.tasks.Task`)."""
    return TASKS[task].prompt(question=question, prefix=prompt, template=prompt_template)


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
    """Examples with their tokens; images are decoded and resized on access.

    Args:
        layout: the base's token layout; its ``image_inputs`` cuts the processor's output into
            items and puts each image's tokens into the text. ``None``: fixed-size pixels.
    """

    def __init__(self, examples: list[Example], encoded: list[Encoded], image_processor, layout=None):
        assert len(examples) == len(encoded)
        self.examples = examples
        self.encoded = encoded
        self.image_processor = image_processor
        self.layout = layout

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
        processed = self.image_processor(images, return_tensors="pt")
        if self.layout is None:
            return [{**item, **self.encoded[i]} for i, item in zip(indices, PIXELS.split(processed))]
        items = self.layout.image_inputs.split(processed)
        return [{**item, **self.layout.with_image(self.encoded[i], item)} for i, item in zip(indices, items)]


def _load(example: Example):
    return load_image(example.image, name=None if isinstance(example.image, str) else example.origin)


@dataclass(frozen=True)
class Collator:
    """Pads a list of items on the right into one batch, each key as the layout says.

    Args:
        pad_token_id: pads ``input_ids`` (and ``labels`` get -100) when ``padding`` is not given.
        padding: the layout's :meth:`~multimodal_lora.families.layouts.TokenLayout.padding`.
        image_inputs: the layout's ``image_inputs``: joins the images' items, adds per-token inputs.
    """

    pad_token_id: int = 0
    padding: tuple[Padding, ...] | None = None
    image_inputs: ImageInputs = PIXELS

    @classmethod
    def of(cls, layout) -> Collator:
        """The collator a token layout's examples need (its padding and its image inputs)."""
        return cls(layout.pad_token_id, layout.padding(), layout.image_inputs)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        padding = self.padding or (Padding("input_ids", self.pad_token_id, "attention_mask"), Padding("labels", IGNORE_INDEX))
        batch = {}
        for pad in padding:
            # One tensor per key for the whole batch, scattered through the padding mask:
            # a torch.tensor call per row cost 1.7% of a tiny-model step.
            rows = [item[pad.key] for item in items]
            lengths = torch.tensor([len(ids) for ids in rows])
            mask = torch.arange(int(lengths.max())) < lengths[:, None]
            values = torch.full(mask.shape, pad.value, dtype=torch.long)
            values[mask] = torch.tensor([t for ids in rows for t in ids], dtype=torch.long)
            batch[pad.key] = values
            if pad.mask is not None:
                batch[pad.mask] = mask.long()
        batch.update(self.image_inputs.collate(items))
        batch.update(self.image_inputs.token_inputs(batch["input_ids"]))
        return batch


# Tensors below this size cross from a DataLoader worker inside the pickled batch.
SMALL_TENSOR_BYTES = 4 * 2**20


class WorkerCollator:
    """A collator for DataLoader workers that sends small tensors to the main process as numpy arrays.

    A tensor leaves a worker as a shared-memory segment whose file descriptor the
    main process fetches through a socket, one round trip per tensor: for the
    tiny recipe's four or five tensors a batch that was about 5 ms a step in the
    main process, more than the rest of the loop's overhead. An array of a few
    hundred KB is copied inside the pickled batch in well under 0.1 ms. Large
    tensors (real images at real batch sizes) still go through shared memory,
    where one round trip is cheaper than copying them. :func:`as_tensors` turns
    the arrays back, without copying.
    """

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, rows) -> dict:
        batch = self.collate(rows)
        return {key: _small_as_array(value) for key, value in batch.items()}


def _small_as_array(value):
    if not isinstance(value, torch.Tensor) or value.dtype == torch.bfloat16:  # numpy has no bfloat16
        return value
    if value.numel() * value.element_size() >= SMALL_TENSOR_BYTES:
        return value
    return value.numpy()


def as_tensors(batch: dict) -> dict:
    """A batch from :class:`WorkerCollator` with its arrays as tensors again (sharing their memory)."""
    return {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for key, value in batch.items()}
