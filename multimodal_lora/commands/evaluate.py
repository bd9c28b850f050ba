"""The evaluation command: base and adapter side by side on a recipe's validation split.

    python -m multimodal_lora.evaluate RECIPE --adapter DIR [key=value ...]

What it measures and writes is :func:`multimodal_lora.evaluate.run.evaluate`; this prints the table.
"""

from __future__ import annotations

import argparse

from multimodal_lora.commands import add_load_arguments, run_cli
from multimodal_lora.core.log_setup import setup_logging
from multimodal_lora.core.metrics import METRICS
from multimodal_lora.evaluate.run import evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multimodal_lora.evaluate",
        description="Evaluate the base and an adapter side by side on the recipe's validation split.",
        epilog="Example: python -m multimodal_lora.evaluate recipes/tiny.yaml --adapter runs/tiny/adapter",
    )
    parser.add_argument("recipe", help="the YAML recipe the adapter was trained with")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for training")
    parser.add_argument("--adapter", required=True, help="adapter directory (or the run directory holding adapter/)")
    parser.add_argument("--out", help="report directory (default: beside the adapter, eval/)")
    parser.add_argument("--max-images", type=int, help="evaluate at most this many validation images")
    parser.add_argument("--samples", type=int, default=8, help="images shown in the report (default 8)")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java VM)")
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    from multimodal_lora.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    out, table = evaluate(
        recipe, args.adapter, args.out, max_images=args.max_images, samples=args.samples, meteor=not args.no_meteor,
        quantization=args.quantization, dtype=args.dtype, device=args.device,
    )  # fmt: skip
    columns = list(table)
    print(f"{'metric':<16}" + "".join(f"{c:>12}" for c in columns))
    for key in ["val_loss", *METRICS]:
        print(f"{key:<16}" + "".join(f"{'n/a' if table[c][key] is None else format(table[c][key], '.4f'):>12}" for c in columns))
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)

