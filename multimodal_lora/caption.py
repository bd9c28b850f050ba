"""Caption images from the command line.

    python -m multimodal_lora.caption IMAGE [IMAGE ...] --adapter DIR

Prints one line per image: the path, a tab, the caption.
"""

from __future__ import annotations

import argparse

from multimodal_lora.cli import run_cli, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimodal_lora.caption", description="Caption images with a BLIP-2 base and a LoRA adapter.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--adapter", help="adapter directory written by the trainer (default: the bare base)")
    parser.add_argument("--base", help="base model (default: the one the adapter was trained on, else tiny)")
    parser.add_argument("--prompt", help="text the caption continues")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    args = parser.parse_args(argv)
    setup_logging()
    from multimodal_lora.inference import captioner_for

    captioner, name = captioner_for(args.adapter, args.base)
    captions = captioner.caption(list(args.images), adapter=name, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    for path, text in zip(args.images, captions):
        print(f"{path}\t{text}")
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
