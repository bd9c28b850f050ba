"""The demo command: the Gradio page for a base and its adapters.

    python -m multimodal_lora.demo                 # adapters under runs/, http://127.0.0.1:7860
    python demo/app.py --adapters-dir runs --port 7861

The page itself is :mod:`multimodal_lora.demo`.
"""

from __future__ import annotations

import argparse

from multimodal_lora.commands import add_load_arguments, run_cli
from multimodal_lora.core.log_setup import setup_logging
from multimodal_lora.demo import DEFAULT_ADAPTERS_DIR, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimodal_lora.demo", description="Web demo: caption and VQA with a base and its adapters.")
    parser.add_argument("--adapters-dir", default=DEFAULT_ADAPTERS_DIR, help="directory searched for adapters (default: runs)")
    parser.add_argument("--base", help="base model (default: the base of the adapters found, else tiny)")
    add_load_arguments(parser, what="the base")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--max-file-size", default="10mb", help="largest upload accepted (default 10mb)")
    parser.add_argument("--concurrency", type=int, default=1, help="generations run at once (default 1)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait (default 64)")
    args = parser.parse_args(argv)
    setup_logging()
    serve(
        args.adapters_dir,
        base=args.base,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        host=args.host,
        port=args.port,
        share=args.share,
        max_file_size=args.max_file_size,
        concurrency_limit=args.concurrency,
        max_queue=args.max_queue,
    )
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)

