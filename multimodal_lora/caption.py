"""Caption images from the command line: files, directories or globs, to the screen or a file.

    python -m multimodal_lora.caption IMAGE|DIR|GLOB ... --adapter DIR [--out captions.jsonl]

Without ``--out`` it prints one line per image: the path, a tab, the caption.
With ``--out FILE.jsonl`` or ``FILE.csv`` it writes rows with ``image`` and
``caption`` (and ``error`` for an image that could not be read), showing a
progress bar. Images are captioned ``--batch-size`` at a time on the device;
an unreadable image is reported and skipped, never the end of the run. The
adapter is merged into the base's weights for the run (``--no-merge`` keeps it
apart; an int8 or 4-bit base is never merged). The
exit status is 0 when every image was captioned, 1 when some could not be.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from pathlib import Path

from multimodal_lora.atomic import atomic_file
from multimodal_lora.callable_module import forward_calls
from multimodal_lora.cli import add_load_arguments, run_cli, setup_logging
from multimodal_lora.errors import UserError

# What a directory argument expands to (case-insensitive); other files there are ignored.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimodal_lora.caption", description="Caption images with a BLIP-2 base and a LoRA adapter.")
    parser.add_argument("images", nargs="*", help="image files, directories (their images), or quoted globs such as 'photos/**/*.jpg'")
    parser.add_argument("--adapter", help="adapter directory written by the trainer (default: the bare base)")
    parser.add_argument("--base", help="base model (default: the one the adapter was trained on, else tiny)")
    add_load_arguments(parser)
    parser.add_argument("--out", help="write the captions to this .jsonl or .csv file instead of the screen")
    parser.add_argument("--question", help="ask this question about every image (a VQA adapter) instead of captioning")
    parser.add_argument("--prompt", help="text the caption continues")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    parser.add_argument("--batch-size", type=int, help="images per generate call (default: 32 on a CPU, 64 on a GPU)")
    parser.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold the adapter into the base's weights for this run: faster, same captions up to float rounding "
        "(default; never done for an int8/4-bit base, which runs unmerged)",
    )
    parser.add_argument(
        "--validation",
        type=int,
        metavar="N",
        help="caption the first N validation images of the run that wrote --adapter, next to their references",
    )
    args = parser.parse_args(argv)
    if not args.images and not args.validation:
        parser.error("give image files, directories or globs, or --validation N with --adapter")
    out_format = _out_format(args.out) if args.out else None
    setup_logging()
    if args.validation:
        captioner, name = _captioner(args)
        return _caption_validation(captioner, name, args)
    paths = expand_inputs(args.images)
    captioner, name = _captioner(args)
    rows = caption_files(captioner, name, paths, args, progress=args.out is not None)
    failed = [r for r in rows if "error" in r]
    if args.out:
        write_rows(rows, Path(args.out), out_format, question=args.question is not None)
        print(f"wrote {len(rows) - len(failed)} captions to {args.out}", file=sys.stderr)
    else:
        for row in rows:
            print(f"{row['image']}\t{row.get('answer', row.get('caption')) if 'error' not in row else 'ERROR: ' + row['error']}")
    if failed:
        print(f"{len(failed)} of {len(rows)} images could not be captioned:", file=sys.stderr)
        for row in failed:
            print(f"  {row['error']}", file=sys.stderr)
        return 1
    return 0


def _captioner(args):
    """The captioner for ``--adapter``, merged into its base unless ``--no-merge`` (or a quantized base)."""
    from multimodal_lora.inference import captioner_for

    load = dict(quantization=args.quantization, dtype=args.dtype, device=args.device)
    captioner, name = captioner_for(args.adapter, args.base, **load)
    if name is not None and args.merge:
        captioner.merge(name)
    return captioner, name


def expand_inputs(items: list[str]) -> list[str]:
    """Files as given, a directory's images (sorted), a glob's matches (sorted).

    A name that is neither a file, a directory nor a glob with matches is kept,
    so that it is reported as missing in the output like any unreadable image.

    Raises:
        UserError: a directory or glob matched no image at all.
    """
    paths: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{item}: directory has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif glob.has_magic(item) and not os.path.exists(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise UserError(f"{item}: no files match this pattern")
            paths.extend(found)
        else:
            paths.append(item)
    return paths


def caption_files(captioner, name, paths: list[str], args, progress: bool = True) -> list[dict]:
    """Caption ``paths`` in batches; a file that cannot be read gets an ``error`` instead."""
    from tqdm import tqdm

    from multimodal_lora.data.images import load_image
    from multimodal_lora.errors import ImageError

    rows: list[dict] = []
    options = dict(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
    )
    batch_size = args.batch_size or captioner.batch_size
    bar = tqdm(total=len(paths), unit="image", desc="captioning", disable=not progress, file=sys.stderr)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        # Decode this batch first, so one bad file costs only its own row.
        chunk_rows: list[dict] = []
        good = []
        for path in chunk:
            try:
                good.append((len(chunk_rows), load_image(path)))
                chunk_rows.append({"image": path})
            except ImageError as exc:
                chunk_rows.append({"image": path, "error": str(exc)})
        if good:
            images = [image for _, image in good]
            if args.question is not None:
                texts = captioner.ask(images, args.question, adapter=name, **options)
            else:
                texts = captioner.caption(images, adapter=name, prompt=args.prompt, **options)
            for (i, _), text in zip(good, texts):
                if args.question is not None:
                    chunk_rows[i].update(question=args.question, answer=text)
                else:
                    chunk_rows[i]["caption"] = text
        rows.extend(chunk_rows)
        bar.update(len(chunk))
    bar.close()
    return rows


def write_rows(rows: list[dict], out: Path, out_format: str, question: bool = False) -> None:
    """Write rows as JSONL or CSV, atomically (a temporary file renamed into place)."""
    fields = ["image", "question", "answer", "error"] if question else ["image", "caption", "error"]
    with atomic_file(out, "the captions") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        if out_format == "jsonl":
            for row in rows:
                f.write(json.dumps({k: row[k] for k in fields if k in row}, ensure_ascii=False) + "\n")
        else:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)


def _out_format(out: str) -> str:
    suffix = Path(out).suffix.lower()
    if suffix in (".jsonl", ".csv"):
        return suffix[1:]
    raise UserError(f"--out {out}: name a .jsonl or .csv file")


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


# `from multimodal_lora import caption` is the caption() function whether or not this module was imported first.
forward_calls(__name__, "multimodal_lora.inference", "caption")

if __name__ == "__main__":
    cli()
