"""The optimizer and its schedule."""

from __future__ import annotations

import torch

from multimodal_lora.config import Recipe
from multimodal_lora.core.runtime import fused_adamw


def build_optimizer(params: list, lr: float, weight_decay: float, device: torch.device):
    """AdamW updating all LoRA tensors in a few fused kernels instead of a loop over them.

    ``fused`` where :func:`~multimodal_lora.core.runtime.fused_adamw` says (CUDA); ``foreach``
    (multi-tensor) elsewhere. All compute what the single-tensor loop does.
    """
    fused = fused_adamw(device, params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None, foreach=None if fused else True)


def build_scheduler(recipe: Recipe, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[recipe.train.scheduler]
    warmup = int(recipe.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
