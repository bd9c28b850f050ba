"""The optimizer and its schedule."""

from __future__ import annotations

import torch

from multimodal_lora.config import Recipe


def build_optimizer(params: list, lr: float, weight_decay: float, device: torch.device):
    """AdamW updating all LoRA tensors in a few fused kernels instead of a loop over them.

    ``fused`` on CUDA; ``foreach`` (multi-tensor) elsewhere. All compute what the
    single-tensor loop does. (torch's fused CPU kernel saves 0.4 ms a step on the
    tiny recipe, but with it the recipe's held-out exact match was 169/200 with
    the shipped seed against 180/200 with ``foreach``, and 175 against 176 with
    seed 1: not worth the risk.)
    """
    fused = device.type == "cuda" and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None, foreach=None if fused else True)


def build_scheduler(recipe: Recipe, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[recipe.train.scheduler]
    warmup = int(recipe.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
