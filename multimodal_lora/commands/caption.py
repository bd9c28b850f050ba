"""Caption images from the command line: files, directories, globs, lists or manifests, to the screen or a file.

    python -m multimodal_lora.caption IMAGE|DIR|GLOB|LIST.txt|MANIFEST.jsonl ... --adapter DIR [--out captions.jsonl]
    accelerate launch --num_processes N -m multimodal_lora.caption INPUTS ... --adapter DIR --out captions.jsonl [--resume]

Without ``--out`` it prints one line per image: the path, a tab, the caption.
With ``--out FILE.jsonl`` or ``FILE.csv`` it writes rows with ``image`` and
``caption`` (and ``error`` for an image that could not be read), in input
order, each batch flushed as it is captioned, with a progress bar (images/s
and ETA over all processes). ``--resume`` continues a file an interrupted run
left. Under ``accelerate launch`` the processes share the images (see
:mod:`multimodal_lora.inference.captioning.run`). An unreadable image is reported and
skipped, never the end of the run. The exit status is 0 when every image was
captioned, 1 when some could not be. The adapter is merged into the base's
weights for the run (``--no-merge`` keeps it apart; an int8 or 4-bit base is
never merged).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from multimodal_lora.commands import add_load_arguments, run_cli
from multimodal_lora.core.errors import UserError
from multimodal_lora.core.generation import GenerationOptions
from multimodal_lora.core.log_setup import setup_logging
from multimodal_lora.core.tasks import TASKS
from multimodal_lora.inference.captioning.inputs import check_inputs, count_inputs, iter_inputs
from multimodal_lora.inference.captioning.output import check_out, open_rows, out_format, read_existing, row_fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimodal_lora.caption", description="Caption images with a BLIP-2 base and a LoRA adapter.")
    parser.add_argument(
        "images", nargs="*",
        help="image files, directories (their images), quoted globs such as 'photos/**/*.jpg', "
        "text files of paths (.txt, one per line) or manifests (.jsonl/.csv with an image column)",
    )  # fmt: skip
    parser.add_argument("--adapter", help="adapter directory written by the trainer (default: the bare base)")
    parser.add_argument("--base", help="base model (default: the one the adapter was trained on, else tiny)")
    add_load_arguments(parser)
    parser.add_argument("--out", help="write the captions to this .jsonl or .csv file instead of the screen")
    parser.add_argument("--resume", action="store_true", help="continue --out where an interrupted run stopped")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--question", help="ask this question about every image (a VQA adapter) instead of captioning")
    parser.add_argument("--prompt", help="text the caption continues")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    parser.add_argument(
        "--batch-size", type=int, help="images per generate call, per process (default: 32 on a CPU, 64 on a GPU)"
    )
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images ahead of generation (0: none)")
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
    engine = parser.add_argument_group("engine", "--engine vllm: generation in vLLM (BLIP-2 OPT; see docs/serving.md)")
    engine.add_argument(
        "--engine", choices=["builtin", "vllm"], default="builtin",
        help="builtin: this package, every family, int8/4-bit (default); vllm: vLLM's engine, many GPUs",
    )  # fmt: skip
    from multimodal_lora.vllm.captioner import add_arguments as add_vllm_arguments

    add_vllm_arguments(engine)
    args = parser.parse_args(argv)
    if not args.images and not args.validation:
        parser.error("give image files, directories, globs, lists or manifests, or --validation N with --adapter")
    if args.resume and not args.out:
        parser.error("--resume continues an --out file; give --out")
    if (args.batch_size is not None and args.batch_size < 1) or args.num_workers < 0:
        parser.error("--batch-size must be at least 1 and --num-workers 0 or more")
    fmt = out_format(args.out) if args.out else None
    setup_logging()
    if args.engine == "vllm" and (args.validation or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        parser.error("--engine vllm captions inputs in one process (vLLM spreads the work: --data-parallel-size); "
                     "--validation and accelerate launch are the built-in engine's")  # fmt: skip
    if args.validation:
        captioner, name = _captioner(args)
        return _caption_validation(captioner, name, args)
    # A bad directory, glob or manifest, or an --out that is in the way, fails before the model loads.
    check_inputs(args.images)
    if args.out:
        check_out(Path(args.out), resume=args.resume, overwrite=args.overwrite)
        if args.resume and Path(args.out).is_file():
            _check_resume_matches(args, read_existing(Path(args.out), fmt, row_fields(args.question is not None)))
    if args.engine == "vllm":
        from multimodal_lora.vllm.captioner import from_args

        with from_args(args) as captioner:
            args.batch_size = args.batch_size or captioner.batch_size
            return caption_inputs(captioner, captioner.name, args, fmt, None)
    state = _distributed_state()
    captioner, name = _captioner(args, _process_device(state))
    if args.batch_size is None:
        args.batch_size = captioner.batch_size
    return caption_inputs(captioner, name, args, fmt, state)


def caption_inputs(captioner, name, args, fmt: str | None, state) -> int:
    """Caption ``args.images`` (on this process's share) into ``args.out`` or stdout; returns the exit status."""
    from multimodal_lora.inference.captioning.run import ImageRounds, caption_stream

    main = state is None or state.is_main_process
    world, rank = (state.num_processes, state.process_index) if state is not None else (1, 0)
    fields = row_fields(args.question is not None)
    writer, skip = None, 0
    if args.out and main:
        writer, existing = open_rows(Path(args.out), fmt, fields, resume=args.resume, overwrite=args.overwrite)
        skip = existing.rows
        if skip:
            print(f"resuming {args.out}: {skip} rows already written", file=sys.stderr)
    if state is not None and world > 1:
        from accelerate.utils import broadcast_object_list

        skip = broadcast_object_list([skip])[0]
    total = count_inputs(args.images) if main and args.out else None
    # A partial, not a lambda: DataLoader workers started with spawn (macOS) must pickle it.
    rounds = ImageRounds(functools.partial(iter_inputs, list(args.images)), skip, args.batch_size, rank, world, _input_size(captioner))
    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
        temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
    ).keywords()  # fmt: skip
    if args.question is not None:

        def generate(images):
            return captioner.ask(images, args.question, adapter=name, **options)

        def make_row(path, text):
            return {"image": path, "question": args.question, "answer": text}
    else:

        def generate(images):
            return captioner.caption(images, adapter=name, prompt=args.prompt, **options)

        def make_row(path, text):
            return {"image": path, "caption": text}

    write = writer.write if writer is not None else _print_rows
    try:
        result = caption_stream(
            generate, rounds, total=total, write=write, make_row=make_row, num_workers=args.num_workers,
            state=state, progress=args.out is not None,
        )  # fmt: skip
    finally:
        if writer is not None:
            writer.close()
    if not main:
        return 0
    if args.out:
        rate = result.written / result.seconds if result.seconds else 0.0
        print(
            f"wrote {result.written - result.failed} captions to {args.out}"
            + (f" ({result.skipped} already there)" if result.skipped else "")
            + f" in {result.seconds:.1f} s, {rate:.1f} images/s on {world} process{'es' if world > 1 else ''}",
            file=sys.stderr,
        )
    if result.failed:
        print(f"{result.failed} of {result.written} images could not be captioned:", file=sys.stderr)
        for error in result.errors:
            print(f"  {error}", file=sys.stderr)
        if result.failed > len(result.errors):
            print(f"  ... and {result.failed - len(result.errors)} more (rows with an error in {args.out})", file=sys.stderr)
        return 1
    return 0


def _print_rows(rows: list[dict]) -> None:
    for row in rows:
        text = "ERROR: " + row["error"] if "error" in row else row.get("answer", row.get("caption"))
        print(f"{row['image']}\t{text}", flush=True)


def _captioner(args, device: str | None = None):
    """The captioner for ``--adapter`` (on ``device`` when given), merged into its base unless ``--no-merge``.

    A quantized (int8, 4-bit) base is never merged: :meth:`Captioner.merge` says so and leaves it unmerged.
    """
    from multimodal_lora.inference.captioner import captioner_for

    load = dict(quantization=args.quantization, dtype=args.dtype, device=args.device)
    if device is not None and args.device in (None, "auto", "cuda"):
        load["device"] = device  # each process on its own GPU
    captioner, name = captioner_for(args.adapter, args.base, **load)
    if name is not None and args.merge:
        captioner.merge(name)
    return captioner, name


def _check_resume_matches(args, existing) -> None:
    """The file's last row must be the input at that position: else it is another job's output."""
    import itertools

    if not existing.rows:
        return
    expected = next(itertools.islice(iter_inputs(args.images), existing.rows - 1, None), None)
    if expected != existing.last_image:
        raise UserError(
            f"--resume: {args.out} has {existing.rows} rows and the last is {existing.last_image!r}, but input "
            f"{existing.rows} is {expected!r}; these are other inputs. Use another --out, or --overwrite"
        )


def _distributed_state():
    """accelerate's ``PartialState`` when launched on several processes, else ``None`` (one process, as before).

    The processes only exchange finished rows (a few strings per batch), so they talk over gloo
    on the CPU whatever the device: that also lets several processes share one GPU, which NCCL refuses.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=True)


def _process_device(state) -> str | None:
    """This process's GPU (``cuda:LOCAL_RANK``, wrapping round when processes outnumber GPUs), or ``None``."""
    import torch

    if state is None or not torch.cuda.is_available():
        return None
    index = state.local_process_index % torch.cuda.device_count()
    torch.cuda.set_device(index)  # "cuda" anywhere below means this GPU, not GPU 0
    return f"cuda:{index}"


def _input_size(captioner) -> tuple[int, int] | None:
    size = getattr(captioner.processor.image_processor, "size", None) or {}
    if "height" in size and "width" in size:
        return (int(size["width"]), int(size["height"]))
    return None


def _caption_validation(captioner, name, args) -> int:
    """Caption validation images of the adapter's own run and show the references beside them."""
    from multimodal_lora.adapter import find_adapter_dir
    from multimodal_lora.config import load_recipe
    from multimodal_lora.core.errors import UserError
    from multimodal_lora.data.sources import load_splits

    if args.adapter is None:
        raise UserError("--validation needs --adapter: the validation images are those of the adapter's run")
    recipe_path = find_adapter_dir(args.adapter).parent / "recipe.yaml"
    if not recipe_path.is_file():
        raise UserError(f"{recipe_path} not found: --validation reads the recipe the trainer saved beside the adapter")
    recipe = load_recipe(recipe_path)
    examples = load_splits(recipe.data).validation[: args.validation]
    if not examples:
        raise UserError(f"the run's data ({recipe.data.path}) has no validation split to caption")
    if TASKS[recipe.data.task].asks:
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

