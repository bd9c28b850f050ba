"""The training command: fine-tune a vision-language model's language model with LoRA.

    python -m multimodal_lora.train RECIPE [key=value ...]
    python -m multimodal_lora.train RECIPE resume=true          # continue after a crash or a stop
    accelerate launch -m multimodal_lora.train RECIPE [key=value ...]

The recipe itself, top to bottom, is :mod:`multimodal_lora.training.recipe`.
"""

from __future__ import annotations

import argparse

from multimodal_lora.commands import run_cli
from multimodal_lora.config import load_recipe
from multimodal_lora.core.log_setup import setup_logging
from multimodal_lora.training import train

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multimodal_lora.train",
        description="Fine-tune a vision-language model's language model (BLIP-2, Qwen2.5-VL, Qwen3-VL, PaliGemma 2, SmolVLM2) with LoRA, as a recipe says.",
        epilog="Example: python -m multimodal_lora.train recipes/tiny.yaml output_dir=runs/mine train.epochs=2",
    )
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value or section.key=value, e.g. lora.r=8, resume=true")
    parser.add_argument(
        "--plan", action="store_true", help="print the estimated GPU memory and parameter table, and load nothing"
    )
    args = parser.parse_args(argv)
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    if args.plan:
        from multimodal_lora.model.plan import plan_recipe

        print(plan_recipe(recipe).format())
        return 0
    train(recipe)
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)
