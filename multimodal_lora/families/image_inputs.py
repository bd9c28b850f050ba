"""Visual inputs: how a family's image-processor output becomes per-example items, and items a batch.

A Q-Former family (BLIP-2, InstructBLIP) gets one fixed-size ``pixel_values``
tensor per image and a fixed number of image tokens already in its text:
:data:`PIXELS`, the default. Other families differ in two ways, and a
family says how through its own :class:`ImageInputs`:

* **what the processor returns**: patches of all images concatenated plus a
  per-image grid (Qwen2-VL/2.5-VL), or extra per-image tensors
  (``pixel_attention_mask``); :meth:`ImageInputs.split` cuts one processor
  call's output into one item per image, :meth:`ImageInputs.collate` joins
  items back into the model's keyword arguments (stacked or concatenated);
* **how many tokens an image takes**, which may depend on the image's size:
  text is tokenized once with *one* placeholder per image, and
  :meth:`ImageInputs.image_tokens` tells, once the image is processed, how
  many copies of it the language model needs (the layout expands it, labels
  -100; see :meth:`~multimodal_lora.families.layouts.TokenLayout.with_image`).
  ``None`` means the count is fixed and already in the text.

Per-token inputs that follow from where the image tokens are (Qwen's
``mm_token_type_ids``) come from :meth:`ImageInputs.token_inputs`, computed
on the padded ids of a batch, in training and at generation alike.

**The frozen-feature cache** for such a family stores, per image, what the
model's own ``get_image_features`` returns for it (a ``(tokens, hidden)``
tensor whose length varies with the image) and the item keys named in
:attr:`ImageInputs.cache_keeps` (what the text and the model still need
without the pixels: Qwen's ``image_grid_thw`` for its 3-D positions, SmolVLM's
tile grid for its placeholder block). :meth:`ImageInputs.image_features`
computes them, :meth:`ImageInputs.feature_inputs` feeds them back through the
model's ``mm_encoder_outputs`` argument, which merges them into the image
placeholders exactly as it merges features it computed itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class ImageInputs:
    """Fixed-size images and a fixed image-token count: the interface, and BLIP-2's behaviour."""

    max_tokens: int | None = None
    """The most tokens one image takes in the language model's sequence when the count varies
    (length checks use it); ``None``: fixed, the layout's ``num_query_tokens``."""

    cache_keeps: ClassVar[tuple[str, ...] | None] = None
    """For the frozen-feature cache: the item keys a cached image keeps beside its features;
    ``None``: the features are one fixed-shape prefix per image, cached as such (BLIP-2, PaliGemma)."""

    def split(self, processed: Mapping) -> list[dict[str, torch.Tensor]]:
        """One processor call's output (``BatchFeature``) as one item per image."""
        return [{"pixel_values": pixels} for pixels in processed["pixel_values"]]

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Items (or dataset rows that hold them) as the model's keyword arguments."""
        if not items or "pixel_values" not in items[0]:
            return {}  # rows with a cached prefix instead of pixels
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items])}

    def image_tokens(self, item: Mapping) -> int | None:
        """How many tokens this image takes, or ``None`` when that is fixed and already in the text."""
        return None

    def token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token model inputs that follow from the padded ``input_ids`` (none here)."""
        return {}

    def image_features(self, model, items: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Each image's features as its language model receives them, by name, each ``(tokens, ...)``
        with the image's token count first: ``{"pooler_output": (tokens, hidden)}`` from the model's
        own ``get_image_features``. A model whose encoder hands the language model more per token
        (Qwen3-VL's deepstack features) returns those too, under names of its own, and rebuilds them
        in :meth:`feature_inputs`.

        Args:
            model: the base (not a PEFT wrapper), its image path frozen and in eval mode.
            items: one item per image (:meth:`split`), on the model's device.
        """
        out = model.get_image_features(**self.collate(items), return_dict=True)
        return [{"pooler_output": f} for f in out.pooler_output]

    def feature_inputs(self, features: list[Mapping[str, torch.Tensor]]) -> dict:
        """Forward keyword arguments that feed each image's cached features (in batch order) instead of
        pixels: the model's ``mm_encoder_outputs``, which its forward merges into the placeholders with
        its own ``get_placeholder_mask`` and ``masked_scatter``, as it merges the features it computes."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooled = tuple(f["pooler_output"] for f in features)
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pooled)}}


PIXELS = ImageInputs()
"""The default: one ``pixel_values`` tensor per image, stacked; image tokens fixed in the text."""
