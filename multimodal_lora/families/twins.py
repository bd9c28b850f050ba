"""What the tiny twins of the decoder-only families with a ViT image path (Qwen2.5-VL, Qwen3-VL, PaliGemma,
SmolVLM) share: their random weights and their generation defaults."""

from __future__ import annotations

import torch

from multimodal_lora.families.base import scaled_init

VISION_SEED_OFFSET = 2


def init_weights(text: torch.nn.Module, image_parts: tuple[torch.nn.Module, ...], seed: int, text_std: float) -> None:
    """A tiny twin's weights: a text model that can produce confident tokens, a selective frozen image path.

    Text embeddings at ``text_std`` (the family's module says why its value), every text linear
    (the output head included, when it is not tied) at 1/sqrt(fan_in) and its bias, where it has one
    (Qwen2's q/k/v do; Gemma's and Llama's linears have none), at zero. The frozen image path scaled
    by 1/sqrt(fan_in) and each row of its position table, where it has one (SigLIP's and Idefics3's
    do; Qwen2.5-VL's vision tower uses rotary positions instead), its own random vector, so that it
    passes on *where* things are (see :mod:`~multimodal_lora.families.blip2_opt`). Each side has its
    own generator, so one does not change when the other does.

    Args:
        text: the language model (with the output head, when it is not tied to the embeddings).
        image_parts: the frozen image path: the vision tower and what connects it to the text model.
        seed: the twin's seed; the text side draws from ``seed + 1``, the image side from
            ``seed + VISION_SEED_OFFSET``.
        text_std: the standard deviation of the text embeddings.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in text.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * text_std)
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.weight.shape[1] ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
    generator = torch.Generator().manual_seed(seed + VISION_SEED_OFFSET)
    modules = [m for part in image_parts for m in part.modules()]
    scaled_init(modules, generator)
    with torch.no_grad():
        for module in modules:
            if isinstance(module, torch.nn.Embedding):  # the vision tower's position table
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))


def set_generation_defaults(model, tokenizer, max_new_tokens: int = 20) -> None:
    """The twin stops on its tokenizer's EOS and pads with its pad token, as the real checkpoints do."""
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.max_new_tokens = max_new_tokens
