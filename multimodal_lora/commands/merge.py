"""The merge command: fold an adapter into its base and write a standalone model directory.

    python -m multimodal_lora.merge --adapter runs/tiny/adapter --out merged/tiny

What a merge does and refuses is :func:`multimodal_lora.merge.merge_adapter`.
"""

from __future__ import annotations

import argparse
import json

from multimodal_lora.commands import run_cli
from multimodal_lora.core.log_setup import setup_logging
from multimodal_lora.core.quantization import NAMES
from multimodal_lora.core.runtime import DTYPE_NAMES
from multimodal_lora.merge import MERGE_RECORD, merge_adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multimodal_lora.merge",
        description="Merge a LoRA adapter into its base and write a standalone transformers model directory.",
    )
    parser.add_argument("--adapter", required=True, help="adapter directory written by the trainer")
    parser.add_argument("--out", required=True, help="directory to write the merged model to")
    parser.add_argument("--base", help="base to merge into (default: the one the adapter records)")
    parser.add_argument(
        "--dtype", choices=list(DTYPE_NAMES), help="dtype of the merged weights (default: the dtype trained in, else fp32)"
    )
    parser.add_argument("--device", default="cpu", help="where to merge: cpu (default), cuda, cuda:N")
    parser.add_argument(
        "--quantization",
        choices=list(NAMES),
        help="how the adapter's base was quantized in training (default: as the adapter records, else the run's recipe.yaml)",
    )
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="the adapter was trained on an int8/4-bit base: merge into the unquantized base anyway",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    setup_logging()
    out = merge_adapter(
        args.adapter,
        args.out,
        base=args.base,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        dequantize=args.dequantize,
        overwrite=args.overwrite,
    )
    model_class = json.loads((out / MERGE_RECORD).read_text())["model_class"]
    print(f"merged model written to {out}; load it with {model_class}.from_pretrained({str(out)!r})")
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)

