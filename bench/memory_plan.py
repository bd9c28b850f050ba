"""Estimate a recipe's training memory before any weights load; check the estimate on CPU.

    python bench/memory_plan.py recipes/football.yaml           # the plan (same as train.py --plan)
    python bench/memory_plan.py recipes/tiny.yaml --check       # plan vs measured, mid-size BLIP-2 on CPU

``--check`` builds a mid-size BLIP-2 (ViT-B-sized vision encoder, BERT-base-sized
Q-Former, OPT-125M-sized language model: about 300 M parameters, so the weights
dominate) on the CPU with random weights, adds the recipe's LoRA, runs
training steps, and compares the process's peak resident-memory growth with
the plan for the same config and batch. Writes ``bench/results/memory_plan.json``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

from harness import quiet, table, write_result

# Mid-size check: batch and text length (the image adds num_query_tokens).
CHECK_BATCH = 4
CHECK_MAX_LENGTH = 32
CHECK_STEPS = 2


def mid_size_config():
    """A BLIP-2 with the real one's shape but smaller parts (~300 M parameters)."""
    from transformers import Blip2Config, OPTConfig
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16)
    qformer = Blip2QFormerConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, encoder_hidden_size=768)
    text = OPTConfig(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12, word_embed_proj_dim=768, vocab_size=50272, dropout=0.0)
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=50265,
    )


def rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; the check needs Linux")


def reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def synthetic_batch(config, batch_size: int, max_length: int):
    """Random pixels and token ids laid out as the trainer lays them out."""
    import torch

    g = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    q = config.num_query_tokens
    text = torch.randint(4, 50000, (batch_size, max_length), generator=g)
    input_ids = torch.cat([torch.full((batch_size, q), config.image_token_index), text], dim=1)
    labels = input_ids.clone()
    labels[:, :q] = -100
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
    }


def check(lora, gradient_checkpointing: bool) -> dict:
    """Plan, then measure peak RSS growth of building and training the mid-size model."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from multimodal_lora.model.base import add_lora
    from multimodal_lora.model.plan import plan_memory

    config = mid_size_config()
    plan = plan_memory(config, quantization="none", dtype="fp32", lora=lora, batch_size=CHECK_BATCH, max_length=CHECK_MAX_LENGTH)
    batch = synthetic_batch(config, CHECK_BATCH, CHECK_MAX_LENGTH)
    gc.collect()
    reset_peak()
    before = rss_bytes("VmRSS")
    start = time.perf_counter()
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = []
    for _ in range(CHECK_STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        losses.append(loss.item())
    measured = rss_bytes("VmHWM") - before
    params = sum(p.numel() for p in model.parameters())
    planned = plan.total(gradient_checkpointing)
    return {
        "config": "mid-size BLIP-2 (ViT-B/16 vision, 12-layer Q-Former, OPT-125M-sized LM), fp32, CPU",
        "parameters": params,
        "batch_size": CHECK_BATCH,
        "sequence_length": plan.sequence_length,
        "gradient_checkpointing": gradient_checkpointing,
        "planned_bytes": planned,
        "measured_peak_rss_growth_bytes": measured,
        "ratio_planned_to_measured": planned / measured,
        "plan": plan.as_dict(),
        "losses": losses,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a YAML recipe, e.g. recipes/football.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for the trainer")
    parser.add_argument("--check", action="store_true", help="measure a mid-size BLIP-2 on the CPU against its plan")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="with --check: train with gradient checkpointing")
    args = parser.parse_args(argv)
    quiet()
    from multimodal_lora.config import load_recipe
    from multimodal_lora.core.errors import UserError
    from multimodal_lora.model.plan import plan_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        plan = plan_recipe(recipe)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.recipe}: {recipe.model.base}, quantization {recipe.model.quantization}, dtype {recipe.model.dtype}")
    print(plan.format())
    result = {"recipe": args.recipe, "plan": plan.as_dict()}
    if args.check:
        found = check(recipe.lora, args.gradient_checkpointing)
        mib = 2**20
        print()
        print(
            table(
                ["mid-size check", "parameters", "planned MiB", "measured MiB", "planned/measured"],
                [[
                    "GC" if args.gradient_checkpointing else "no GC",
                    found["parameters"],
                    found["planned_bytes"] / mib,
                    found["measured_peak_rss_growth_bytes"] / mib,
                    found["ratio_planned_to_measured"],
                ]],
            )
        )
        result["check"] = found
    path = write_result("memory_plan", result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
