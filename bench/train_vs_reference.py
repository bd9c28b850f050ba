"""Our trainer against the usual BLIP-2 LoRA loop, end to end on the full tiny recipe.

    python bench/train_vs_reference.py [--repeats 2] [--epochs N] [--cache-off]

Each run is a whole process, from its start to the adapter on disk, as a user
runs it: imports, data, base, the loop, and (for ours) validation each epoch,
checkpoints and the adapter.

* **ours** is ``python -m multimodal_lora.train recipes/tiny.yaml`` with the
  shipped defaults: 8 epochs of 125 steps × 16, the feature cache on
  (``cache_image_features: auto``), validation loss and 64 validation captions
  after each epoch, all counted. "cold" runs start without a feature cache
  (they build it), "warm" ones find it from the run before, as every later
  run on the same data does. ``--cache-off`` adds ours with
  ``cache_image_features=false``.
* **reference** is ``python bench/reference_loop.py``: PEFT's BLIP-2 int8 LoRA
  example's loop (processor per item, ``labels=input_ids``, no attention
  mask, ``generate`` every 10 steps, nothing held out) for the same number of
  batches of the same size on the same base, LoRA and images, then
  ``save_pretrained``. "without generate" drops its ``generate`` calls, to
  show what they cost.

Runs alternate (ours cold, ours warm, reference, reference without generate,
then again) and medians are reported: wall seconds, and CPU seconds of the
process and its children (steadier than wall time on a shared machine). Each
process gets ``--threads`` torch threads (``OMP_NUM_THREADS``) and a private
cache directory. Writes ``bench/results/train_vs_reference.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import median, table, write_result

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
TARGET = 2.0


def run_process(cmd: list[str], env: dict) -> dict:
    """Wall and CPU seconds (the process and its children) of one command, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": wall, "cpu_seconds": cpu, "stderr": done.stderr}


def ours(workdir: Path, env: dict, epochs: int | None, extra: list[str]) -> dict:
    out = workdir / "ours"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "multimodal_lora.train", str(RECIPE), f"output_dir={out}", *extra]
    if epochs:
        cmd.append(f"train.epochs={epochs}")
    found = run_process(cmd, env)
    log = found.pop("stderr")
    loop = re.search(r"finished: (\d+) steps in ([\d.]+) s", log)
    built = "image features: cached" in log
    return {**found, "steps": int(loop.group(1)), "loop_seconds": float(loop.group(2)), "built_cache": built}


def reference(workdir: Path, env: dict, steps: int, generate: bool) -> dict:
    import json

    out = workdir / "reference"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "bench" / "reference_loop.py"), str(out), "--steps", str(steps)]
    if not generate:
        cmd.append("--no-generate")
    found = run_process(cmd, env)
    found.pop("stderr")
    result = json.loads((out / "result.json").read_text())
    return {**found, "steps": result["steps"], "loop_seconds": result["seconds"], "generations": result["generations"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--epochs", type=int, default=0, help="epochs of the recipe (0: the recipe's own, 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--cache-off", action="store_true", help="also run ours with cache_image_features=false")
    args = parser.parse_args(argv)

    sys.path.insert(1, str(REPO))
    import math

    from multimodal_lora.config import load_recipe

    recipe = load_recipe(RECIPE, [f"train.epochs={args.epochs}"] if args.epochs else [])
    from multimodal_lora.data.sources import load_splits

    steps = recipe.train.epochs * math.ceil(len(load_splits(recipe.data).train) / recipe.train.batch_size)
    with tempfile.TemporaryDirectory(prefix="tvr-") as tmp:
        workdir = Path(tmp)
        cache = workdir / "cache"
        env = {
            **os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
            "MULTIMODAL_LORA_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        }  # fmt: skip

        def ours_cold():
            shutil.rmtree(cache / "features", ignore_errors=True)  # this run builds the cache
            return ours(workdir, env, args.epochs, [])

        variants = {
            "ours, cold cache": ours_cold,
            "ours, warm cache": lambda: ours(workdir, env, args.epochs, []),
            "reference": lambda: reference(workdir, env, steps, generate=True),
            "reference without generate": lambda: reference(workdir, env, steps, generate=False),
        }
        if args.cache_off:
            variants["ours, cache off"] = lambda: ours(workdir, env, args.epochs, ["train.cache_image_features=false"])
        # Warm-up: builds the tiny base and the shapes images into the private cache, fills the page cache.
        ours(workdir, env, 1, ["train.max_steps=2", "train.eval_captions=false"])
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, run in variants.items():
                runs[name].append(run())
                r = runs[name][-1]
                print(
                    f"[{repeat + 1}/{args.repeats}] {name}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU",
                    flush=True,
                )
    summary = {
        name: {
            "seconds": median(r["seconds"] for r in found),
            "cpu_seconds": median(r["cpu_seconds"] for r in found),
            "loop_seconds": median(r["loop_seconds"] for r in found),
            "steps": found[0]["steps"],
        }
        for name, found in runs.items()
    }
    ref = summary["reference"]
    rows = [
        [
            name,
            s["steps"],
            s["seconds"],
            ref["seconds"] / s["seconds"],
            s["cpu_seconds"],
            ref["cpu_seconds"] / s["cpu_seconds"],
        ]
        for name, s in summary.items()
    ]
    print(table(
        ["run (process start to adapter on disk)", "steps", "wall s", "× reference", "CPU s", "× reference (CPU)"],
        rows,
        title=f"recipes/tiny.yaml, {steps} steps × {recipe.train.batch_size}, {args.threads} torch thread(s), "
        f"median of {args.repeats} alternating runs; load average {os.getloadavg()[0]:.1f}",
    ))  # fmt: skip
    generate_share = 1 - summary["reference without generate"]["cpu_seconds"] / ref["cpu_seconds"]
    print(f"\nthe reference's generate calls: {generate_share:.0%} of its CPU time")
    for name in ("ours, cold cache", "ours, warm cache"):
        print(
            f"{name} / reference = {ref['cpu_seconds'] / summary[name]['cpu_seconds']:.2f}× in CPU time (target ≥ {TARGET})"
        )
    path = write_result(
        "train_vs_reference",
        {
            "recipe": "recipes/tiny.yaml", "steps": steps, "batch_size": recipe.train.batch_size, "repeats": args.repeats,
            "threads": args.threads, "summary": summary, "runs": runs, "reference_generate_share_cpu": generate_share,
            "target": TARGET,
        },
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
