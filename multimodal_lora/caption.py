"""Caption images from the command line.

    python -m multimodal_lora.caption IMAGE [IMAGE ...] --adapter DIR

Prints one line per image: the path, a tab, the caption.
"""

from __future__ import annotations

import argparse

from multimodal_lora.cli import run_cli, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimodal_lora.caption", description="Caption images with a BLIP-2 base and a LoRA adapter.")
    parser.add_argument("images", nargs="*", help="image files")
    parser.add_argument("--adapter", help="adapter directory written by the trainer (default: the bare base)")
    parser.add_argument("--base", help="base model (default: the one the adapter was trained on, else tiny)")
    parser.add_argument("--prompt", help="text the caption continues")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument(
        "--validation",
        type=int,
        metavar="N",
        help="caption the first N validation images of the run that wrote --adapter, next to their references",
    )
    args = parser.parse_args(argv)
    if not args.images and not args.validation:
        parser.error("give image files, or --validation N with --adapter")
    setup_logging()
    from multimodal_lora.inference import captioner_for

    captioner, name = captioner_for(args.adapter, args.base)
    if args.validation:
        return _caption_validation(captioner, name, args)
    captions = captioner.caption(list(args.images), adapter=name, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    for path, text in zip(args.images, captions):
        print(f"{path}\t{text}")
    return 0


def _caption_validation(captioner, name, args) -> int:
    """Caption validation images of the adapter's own run and show the references beside them."""
    from multimodal_lora.adapter import find_adapter_dir
    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.sources import load_splits
    from multimodal_lora.errors import UserError

    if args.adapter is None:
        raise UserError("--validation needs --adapter: the validation images are those of the adapter's run")
    recipe_path = find_adapter_dir(args.adapter).parent / "recipe.yaml"
    if not recipe_path.is_file():
        raise UserError(f"{recipe_path} not found: --validation reads the recipe the trainer saved beside the adapter")
    recipe = load_recipe(recipe_path)
    examples = load_splits(recipe.data).validation[: args.validation]
    if not examples:
        raise UserError(f"the run's data ({recipe.data.path}) has no validation split to caption")
    if recipe.data.task == "vqa":
        answers = captioner.ask([e.image for e in examples], [e.question for e in examples], adapter=name)
        outputs = [f"{e.question} -> {a}" for e, a in zip(examples, answers)]
    else:
        outputs = captioner.caption([e.image for e in examples], adapter=name, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    hits = 0
    for example, text in zip(examples, outputs):
        produced = text.rsplit(" -> ", 1)[-1]
        hits += produced == example.target
        where = example.image if isinstance(example.image, str) else example.origin
        print(f"{where}\t{text}\t(reference: {example.target})")
    print(f"{hits}/{len(examples)} exactly match their reference")
    return 0


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    cli()
