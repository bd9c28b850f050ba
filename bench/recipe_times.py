"""How long the README's commands take: train a shipped recipe, then caption its validation images.

    python bench/recipe_times.py                                  # recipes/tiny.yaml and recipes/tiny-vqa.yaml
    python bench/recipe_times.py recipes/tiny.yaml --validation 200
    python bench/recipe_times.py recipes/tiny-qwen2vl.yaml --name recipe_times_qwen   # another family, its own file
    python bench/recipe_times.py recipes/tiny.yaml --set seed=1 --name recipe_times_tiny_seed1   # with overrides

For each recipe it runs, as a user does, each in a fresh process:

    python -m multimodal_lora.train RECIPE overwrite=true
    python -m multimodal_lora.caption --adapter OUTPUT_DIR/adapter --validation N

and records the wall time and the CPU time of each (the child process's user +
system time, so that a machine shared with other work shows as CPU time close
to an idle machine's wall time), and how many of the N validation images the
adapter gets exactly right. The run writes where the recipe says (runs/tiny for
recipes/tiny.yaml), so the adapters it leaves are the ones the README's
commands would leave. Writes ``bench/results/recipe_times.json`` (or ``NAME.json``
with ``--name``) with the date (UTC), the machine and its load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import resource
import subprocess
import sys
import time

from harness import ROOT, table, write_result

DEFAULT_RECIPES = ["recipes/tiny.yaml", "recipes/tiny-vqa.yaml"]


def timed_run(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system of the child) and stdout of ``command`` run from the root."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def save(runs: list[dict], load_before: float, note: str, name: str = "recipe_times"):
    return write_result(
        name,
        {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
            "note": note,
            "runs": runs,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=DEFAULT_RECIPES, help="recipes to time (default: tiny and tiny-vqa)")
    parser.add_argument("--validation", type=int, default=200, help="validation images to caption after training (default 200)")
    parser.add_argument("--name", default="recipe_times", help="the result file, bench/results/NAME.json (default recipe_times)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override for every training run (repeatable), e.g. seed=1"
    )
    parser.add_argument("--note", default="", help="what the figures need beside them (e.g. that the feature cache was already built)")
    args = parser.parse_args()

    from multimodal_lora.config import load_recipe

    load_before = os.getloadavg()[0]
    runs = []
    for recipe_path in args.recipes:
        output_dir = load_recipe(ROOT / recipe_path, args.set).output_dir
        train_cmd = [sys.executable, "-m", "multimodal_lora.train", recipe_path, "overwrite=true", *args.set]
        caption_cmd = [
            sys.executable, "-m", "multimodal_lora.caption", "--adapter", f"{output_dir}/adapter", "--validation", str(args.validation),
        ]
        train_wall, train_cpu, _ = timed_run(train_cmd)
        caption_wall, caption_cpu, out = timed_run(caption_cmd)
        hits, total = map(int, re.search(r"(\d+)/(\d+) exactly match", out).groups())
        runs.append({
            "recipe": recipe_path,
            "train_command": " ".join(["python", *train_cmd[1:]]),
            "caption_command": " ".join(["python", *caption_cmd[1:]]),
            "train_wall_s": round(train_wall, 1),
            "train_cpu_s": round(train_cpu, 1),
            "caption_wall_s": round(caption_wall, 1),
            "caption_cpu_s": round(caption_cpu, 1),
            "exact_match": hits,
            "validation_images": total,
        })
        print(f"{recipe_path}: trained in {train_wall:.1f} s ({train_cpu:.1f} CPU s), {hits}/{total} exact", flush=True)
        path = save(runs, load_before, args.note, args.name)  # after each recipe, so that a long second recipe cannot lose the first

    rows = [[r["recipe"], r["train_wall_s"], r["train_cpu_s"], r["caption_wall_s"], f"{r['exact_match']}/{r['validation_images']}"] for r in runs]
    print(table(["recipe", "train wall s", "train CPU s", "caption wall s", "exact match"], rows))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
