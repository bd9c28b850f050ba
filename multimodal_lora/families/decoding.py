"""How the server's decode loop runs a family's model a token at a time (:attr:`Family.decoding`).

The loop (:mod:`multimodal_lora.serve.continuous`) is the same for every family:
it keeps the running rows right-aligned in one key/value cache with a mask (1
where a cache column holds one of the row's positions), lets rows join and leave
between tokens, and chooses tokens from logits. What differs per architecture it
asks a :class:`Decoding`:

* :meth:`Decoding.prefill`: a group of joining requests (their
  ``generation_inputs``: images and left-padded prompts) in one forward, as the
  family's ``generate`` runs its first step, giving their cache, each row's last
  logits and each row's **position offset**;
* :meth:`Decoding.step`: one token for every running row, given the rows' mask
  (with a column for the new token) and their offsets.

A row's next position is the number of positions it holds so far plus its
offset; that offset is all a row carries from its prefill to its steps, and it is
what lets rows of different histories decode together:

* 0 for plain positions (BLIP-2 OPT, InstructBLIP's LLaMA, SmolVLM's LLaMA);
* 1 for PaliGemma, whose positions count from 1;
* Qwen2.5-VL's ``rope_delta``: its image tokens take 3-D positions that advance
  by the image grid's side, not by its token count, so a row's text continues at
  its token count plus that row's delta (see ``qwen2_5_vl.MropeDecoding``).

Each class here reproduces what transformers 5.25's ``generate`` gives the
model's ``forward`` for that family (positions, masks, the first step's extra
inputs), so greedy text equals ``Captioner.caption()``: ``tests/test_continuous.py``
and ``tests/test_family_recipes.py`` check it on rows that join mid-way.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from multimodal_lora.families.base import generation_embeddings


@dataclass(frozen=True)
class Prefill:
    """What a prefill hands the loop for its rows."""

    cache: object
    """Their key/value cache (a ``DynamicCache`` of plain layers), one row each, right-aligned."""
    logits: torch.Tensor
    """``(rows, vocab)``: the logits at each row's last position, from which its first token is chosen."""
    offsets: torch.Tensor
    """``(rows,)``: what each row's next position adds to the number of positions it holds."""


class Decoding:
    """The interface; see the module docstring."""

    def problem(self, model) -> str | None:
        """Why this base (the family's model, not a PEFT wrapper) cannot decode in the loop, else ``None``."""
        return None

    def prefill(self, model, batch: dict[str, torch.Tensor], layout) -> Prefill:
        """Run ``batch`` (a captioner's ``generation_inputs``) through ``model`` as ``generate``'s first step does."""
        raise NotImplementedError

    def step(self, model, tokens: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, cache):
        """One token per row: ``tokens`` ``(rows,)`` are each row's newest; ``mask`` ``(rows, columns + 1)``
        ends with the new token's column. Returns ``(logits (rows, vocab), cache)``."""
        raise NotImplementedError


def text_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each row's positions counted from its first real token (0 on its left padding), as ``generate``
    counts them."""
    return (mask.long().cumsum(dim=-1) - 1).clamp_min(0)


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The keyword a model class's ``forward`` takes its key/value cache by: ``cache`` in recent
    transformers 5.x (``past_key_values`` still works there, with a deprecation warning), else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_of(out):
    """The key/value cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def held(mask: torch.Tensor) -> torch.Tensor:
    """``(rows, 1)``: positions each row holds before the new token (``mask`` ends with the new token's column)."""
    return mask[:, :-1].sum(dim=1, keepdim=True)


class LanguageModelDecoding(Decoding):
    """The Q-Former families (BLIP-2 OPT, InstructBLIP Vicuna): their ``generate`` builds the visual
    prefix once and hands the embeddings to the language model's own ``generate``, a causal LM with
    its head; so does the loop, with plain positions (offset 0)."""

    def problem(self, model) -> str | None:
        if getattr(model.config.text_config, "sliding_window", None):
            return "its language model attends through a sliding window, whose cache cannot be joined row by row"
        return None

    def prefill(self, model, batch, layout) -> Prefill:
        mask = batch["attention_mask"]
        embeds = generation_embeddings(model, batch, layout.image_token_id)
        out = model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=text_positions(mask), use_cache=True, logits_to_keep=1
        )
        return Prefill(cache_of(out), out.logits[:, -1, :], mask.new_zeros(len(mask)))

    def step(self, model, tokens, mask, offsets, cache):
        keyword = cache_keyword(type(model.language_model))
        out = model.language_model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=held(mask),
            use_cache=True, logits_to_keep=1, **{keyword: cache},
        )  # fmt: skip
        return out.logits[:, -1, :], cache_of(out)


@dataclass(frozen=True)
class ModelDecoding(Decoding):
    """Families whose ``generate`` runs the whole model every step (the image path only on the first):
    the loop does the same, through the model's own ``forward``, which applies its head (SmolVLM's
    ``lm_head`` sits on the outer model), its logit soft-capping (Gemma 2) and its masks (PaliGemma's
    bidirectional prefix, built from the prefill's ``token_type_ids``; the steps are causal, as in
    ``generate``, where the cache is filled and no pixels come).

    The cache is a plain ``DynamicCache`` made here: a language model with sliding-window layers
    (Gemma 2) then keeps every position and applies the window through its mask, over cache columns,
    in which a row's own positions stay contiguous; ``generate``'s sliding layers drop only what that
    window masks anyway. (The tests' sequences stay inside the tiny Gemma 2's 4,096-position window:
    past it, this reasoning is untested.)
    """

    first_position: int = 0
    """Where a row's positions start: 0, or 1 for PaliGemma (its ``prepare_inputs_for_generation`` adds 1)."""

    def prefill_positions(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(position_ids for the prefill, each row's offset)``."""
        mask = batch["attention_mask"]
        return text_positions(mask) + self.first_position, mask.new_full((len(mask),), self.first_position)

    def step_positions(self, mask: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The new token's ``position_ids``: ``(rows, 1)``."""
        return held(mask) + offsets[:, None]

    def prefill(self, model, batch, layout) -> Prefill:
        from transformers import DynamicCache

        positions, offsets = self.prefill_positions(model, batch)
        cache = {cache_keyword(type(model)): DynamicCache()}
        out = model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1, **cache)
        return Prefill(cache_of(out), out.logits[:, -1, :], offsets)

    def step(self, model, tokens, mask, offsets, cache):
        out = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=self.step_positions(mask, offsets),
            use_cache=True, logits_to_keep=1, **{cache_keyword(type(model)): cache},
        )  # fmt: skip
        return out.logits[:, -1, :], cache_of(out)


LANGUAGE_MODEL = LanguageModelDecoding()
"""The Q-Former families' decoding."""
