"""Our training loop against the usual reference loop: same model, data, samples and batch size.

    python bench/train_vs_reference.py [--steps 30] [--repeats 2]

The reference is PEFT's public BLIP-2 int8 LoRA example's loop
(bench/reference_loop.py: processor per item, ``labels=input_ids`` with padding,
no attention mask, ``generate`` every 10 steps). Ours is
``multimodal_lora.train.train`` on ``recipes/tiny.yaml``. Both train the same
LoRA on the same tiny base and the same shapes images, for the same number of
batches of the same size; runs alternate (ours, reference, ours, reference, ...)
and the median is reported.

samples/s is end to end: from the call until training is over (data read,
base loaded, LoRA added, the loop, and for ours the adapter saved), so that
any up-front work such as caching frozen image features is counted. The
loop-only figure (``loop samples/s``) is given beside it, and the ratio in
this process's CPU time (steadier than wall time on a shared machine).

Our loop is measured with and without the frozen-feature cache
(``cache_image_features=true``) when this checkout's recipes have that key:
"cold" runs build the cache first (features of every training image, counted
in the run's time), "warm" runs find it on disk, as every later run and epoch
on the same data does.
Writes ``bench/results/train_vs_reference.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from harness import median, quiet, set_threads, table, write_result

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
CACHE_KEY = "cache_image_features"


def overrides(output_dir: Path, steps: int, cache: bool | None) -> list[str]:
    # No validation split: the reference loop evaluates nothing, so neither do we.
    # Every run reuses one output_dir: overwrite=true (a fresh run into a used directory is refused otherwise).
    out = [f"output_dir={output_dir}", "overwrite=true", f"train.max_steps={steps}", "data.val_split=null", "data.val_fraction=0"]
    if cache is not None:
        out.append(f"{CACHE_KEY}={'true' if cache else 'false'}")
    return out


def run_ours(workdir: Path, steps: int, cache: bool | None) -> dict:
    """One run of multimodal_lora.train on the tiny recipe."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.train import train

    recipe = load_recipe(RECIPE, overrides(workdir / "ours", steps, cache))
    start, cpu = time.perf_counter(), time.process_time()
    result = train(recipe)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    samples = result.steps * recipe.train.batch_size
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_second": samples / seconds,
        "loop_samples_per_second": result.samples_per_second,
        "samples_per_cpu_second": samples / cpu,
        "loss": result.final_loss,
    }


def run_reference(steps: int) -> dict:
    """One run of the reference loop on the same recipe's model and data."""
    import torch
    from accelerate.utils import set_seed
    from reference_loop import reference_train

    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.sources import load_splits
    from multimodal_lora.model import add_lora, load_base, load_processor

    recipe = load_recipe(RECIPE, ["data.val_split=null", "data.val_fraction=0"])
    start, cpu = time.perf_counter(), time.process_time()
    set_seed(recipe.seed)
    processor = load_processor(recipe.model.base, recipe.model.revision)
    rows = [{"image": e.image, "text": e.target} for e in load_splits(recipe.data).train]
    model, _ = load_base(recipe.model)
    model = add_lora(model, recipe.lora)
    torch.manual_seed(recipe.seed)
    result = reference_train(model, processor, rows, batch_size=recipe.train.batch_size, lr=recipe.train.lr, max_steps=steps, seed=recipe.seed)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "samples": result["samples"],
        "samples_per_cpu_second": result["samples"] / cpu,
        "seconds": seconds,
        "samples_per_second": result["samples"] / seconds,
        "loop_samples_per_second": result["samples_per_second"],
        "loss": result["loss"],
        "generations": result["generations"],
    }


def drop_feature_cache() -> None:
    """Delete stored image features, so that the next cached run builds them."""
    import shutil

    from multimodal_lora.cache import cache_dir

    shutil.rmtree(cache_dir() / "features", ignore_errors=True)


def cache_supported() -> bool:
    """Whether this checkout's recipes know ``cache_image_features``."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.errors import ConfigError

    try:
        load_recipe(RECIPE, [f"{CACHE_KEY}=true"])
    except ConfigError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="batches per run (0: one epoch of the tiny recipe)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loop, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.sources import load_splits

    recipe = load_recipe(RECIPE)
    steps = args.steps or math.ceil(len(load_splits(recipe.data).train) / recipe.train.batch_size)
    with_cache = cache_supported()
    variants = [("ours, cache off", False if with_cache else None)]
    if with_cache:
        # The cache persists under MULTIMODAL_LORA_CACHE: a cold run builds it (for
        # every training image), later runs of the same data open it.
        variants += [("ours, cache on, cold", True), ("ours, cache on, warm", True)]
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    runs["reference"] = []
    # Warm up once (builds the tiny base and the shapes images into the cache, first imports).
    with tempfile.TemporaryDirectory(prefix="tvr-") as tmp:
        run_ours(Path(tmp), 2, None)
        for _ in range(args.repeats):
            for name, cache in variants:
                if name.endswith("cold"):
                    drop_feature_cache()
                runs[name].append(run_ours(Path(tmp), steps, cache))
            runs["reference"].append(run_reference(steps))
    summary = {name: _summary(found) for name, found in runs.items()}
    ref = summary["reference"]["samples_per_second"]
    rows = [
        [
            name, s["samples"], s["samples_per_second"], s["loop_samples_per_second"], s["samples_per_second"] / ref,
            s["samples_per_cpu_second"] / summary["reference"]["samples_per_cpu_second"],
        ]
        for name, s in summary.items()
    ]
    print(table(
        ["loop", "samples", "samples/s", "loop samples/s", "× reference", "× reference (CPU time)"],
        rows,
        title=f"tiny recipe, batch {recipe.train.batch_size}, {steps} steps, median of {args.repeats} alternating runs",
    ))
    if not with_cache:
        print(f"\nthe frozen-feature cache ({CACHE_KEY}) is not in this checkout: cache-on not measured")
    path = write_result(
        "train_vs_reference",
        {"steps": steps, "batch_size": recipe.train.batch_size, "repeats": args.repeats, "cache_measured": with_cache, "summary": summary, "runs": runs},
    )
    print(f"wrote {path}")
    return 0


def _summary(found: list[dict]) -> dict:
    return {
        "samples": found[0]["samples"],
        "samples_per_second": median(r["samples_per_second"] for r in found),
        "loop_samples_per_second": median(r["loop_samples_per_second"] for r in found),
        "samples_per_cpu_second": median(r["samples_per_cpu_second"] for r in found),
        "seconds": median(r["seconds"] for r in found),
    }


if __name__ == "__main__":
    sys.exit(main())
