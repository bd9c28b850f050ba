"""The data command: data tools from the command line.

    python -m multimodal_lora.data check RECIPE [key=value ...]

``check`` reads the whole data set a recipe names (no model weights) and
prints sources, images and pairs per split, bad examples, token lengths and a
suggested ``data.max_length``; it exits with status 1 when training would
refuse to start, 2 when the recipe or the data set cannot be read at all.
"""

from __future__ import annotations

import argparse

from multimodal_lora.commands import run_cli
from multimodal_lora.core.log_setup import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimodal_lora.data", description="Data tools for multimodal_lora recipes.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check",
        help="read and decode a recipe's whole data set and report what training would see",
        description="Read and decode a recipe's whole data set (no model weights) and report what training would see.",
        epilog="Example: python -m multimodal_lora.data check recipes/tiny.yaml data.path=my_images/",
    )
    check.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    check.add_argument("overrides", nargs="*", help="key=value or section.key=value, e.g. data.on_bad_example=skip")
    args = parser.parse_args(argv)
    setup_logging()
    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.check import check_data

    recipe = load_recipe(args.recipe, args.overrides)
    report = check_data(recipe)
    print(f"data check of {args.recipe}")
    print(report.format())
    return 1 if report.fails else 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)

