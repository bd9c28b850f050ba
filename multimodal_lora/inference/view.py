"""What a :class:`~multimodal_lora.inference.captioner.Captioner` knows without its model.

The names and tasks of its adapters, their prompts, how many tokens a prompt takes,
whether a prompt and an output length fit the base's positions, and how an image
becomes the model's pixels. A server's HTTP process checks and prepares requests with
this while the model runs in another process (:mod:`multimodal_lora.serve.engine_process`);
it is a plain value that pickles, and it cannot generate. A Captioner keeps one (its
:attr:`~multimodal_lora.inference.captioner.Captioner.view`) and answers these questions through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from multimodal_lora.adapter import AdapterMeta
from multimodal_lora.core.errors import AdapterError, ConfigError
from multimodal_lora.core.tasks import CAPTION, DEFAULT_VQA_TEMPLATE, VQA
from multimodal_lora.model.base import BaseInfo


@dataclass
class CaptionerView:
    base: BaseInfo
    processor: Any
    """The base's processor: its tokenizer counts prompt tokens, its image processor makes pixels."""
    layout: Any
    """The family's token layout (:mod:`multimodal_lora.families.layouts`)."""
    max_positions: int | None
    """The language model's position table, or ``None`` (relative positions, T5)."""
    adapters: dict[str, AdapterMeta | None]
    """Loaded adapters by name; a Captioner's view shares its dict, so it follows load_adapter."""

    @property
    def adapter_names(self) -> list[str]:
        """The names of the loaded adapters, in the order they were loaded."""
        return list(self.adapters)

    def meta(self, adapter: str | None) -> AdapterMeta | None:
        """What ``adapter`` records (``None``: the bare base).

        Raises:
            AdapterError: no adapter of that name is loaded.
        """
        if adapter is None:
            return None
        if adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise AdapterError(f"no adapter named {adapter!r} is loaded (loaded: {known}); call load_adapter first")
        return self.adapters[adapter]

    def task(self, adapter: str | None) -> str:
        """``caption`` or ``vqa``: what ``adapter`` was trained for (the bare base captions)."""
        meta = self.meta(adapter)
        return meta.task if meta is not None else "caption"

    def caption_prompt(self, adapter: str | None, prefix: str | None = None) -> str:
        """The text a caption continues: ``prefix``, else the adapter's training prompt, else nothing."""
        meta = self.meta(adapter)
        if prefix is None and meta is not None:
            prefix = meta.prompt
        return CAPTION.prompt(prefix=prefix)

    def vqa_prompt(self, adapter: str | None, question: str) -> str:
        """``question`` in the template the adapter was trained with (the base: ``Question: ... Answer:``)."""
        meta = self.meta(adapter)
        template = meta.prompt_template if meta is not None else DEFAULT_VQA_TEMPLATE
        return VQA.prompt(question=question, template=template)

    def prompt_tokens(self, prompt: str, image: dict | None = None) -> int:
        """Tokens the model reads before generating: the image's, then the prompt as the layout frames
        it (``</s>`` and ``prompt``). ``image`` is what :meth:`pixels` made of it; without it, a family
        whose image-token count varies with the image counts the most an image takes."""
        return self.layout.prompt_length(self.processor.tokenizer, prompt, image)

    @property
    def context_length(self) -> int | None:
        """The most positions (prompt + generated) the language model has, or ``None`` (relative positions, T5)."""
        return self.max_positions

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a prompt of ``prompt_tokens`` and ``max_new_tokens`` new ones fit the base's positions."""
        # The last new token is returned, never fed back: it needs no position.
        return self.max_positions is None or prompt_tokens + max_new_tokens - 1 <= self.max_positions

    def check_length(self, prompts: list[str], max_new_tokens: int) -> None:
        """Refuse, before any image is read, a prompt and length the base's positions cannot hold.

        Raises:
            ConfigError: says how many positions the prompt takes and what to lower.
        """
        if self.max_positions is None:
            return  # relative positions (T5): no table to run past
        start = max((self.prompt_tokens(p) for p in set(prompts)), default=0)
        image = self.layout.image_positions
        if not self.fits(start, max_new_tokens):
            room = self.max_positions - start + 1
            fix = f"lower max_new_tokens to at most {room}" if room >= 1 else "shorten the prompt"
            raise ConfigError(
                f"the prompt takes {start} positions ({image} image tokens, {start - image} text tokens) and "
                f"max_new_tokens={max_new_tokens} needs {max_new_tokens - 1} more, but "
                f"the base holds {self.max_positions}; {fix}"
            )

    def pixels(self, image) -> dict[str, torch.Tensor]:
        """One decoded image as the model's inputs for it (``{"pixel_values": (channels, height, width)}``,
        or what else its family's processor gives per image).

        :meth:`~multimodal_lora.inference.captioner.Captioner.generate_batch` takes these in place of
        images: a server prepares each request's inputs as it arrives, while the model is busy
        with the batch before, instead of all of them at the start of the batch.
        """
        return self.layout.image_inputs.split(self.processor.image_processor([image], return_tensors="pt"))[0]
