"""Steps per second with and without the frozen-feature cache on the families whose features vary in length.

    python bench/feature_cache_families.py [--repeats 1] [--threads 1] [--recipes tiny-qwen2vl tiny-smolvlm]

For each recipe (``recipes/tiny-qwen2vl.yaml``, ``recipes/tiny-smolvlm.yaml`` by default),
trains two epochs without and with ``train.cache_image_features``, alternating, as
``bench/feature_cache_speedup.py`` does for ``recipes/tiny.yaml``; each cached run
builds its features afresh in epoch 1. Epoch 2 is the steady state a cached run
keeps for the rest of training: its steps per second are the figure, side by side.
Validation captioning is off, so only training is timed. Writes
``bench/results/feature_cache_families.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from feature_cache_speedup import run
from harness import median, quiet, set_threads, table, write_result

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["tiny-qwen2vl", "tiny-smolvlm"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="recipes/<name>.yaml to time")
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    runs: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # A private cache root: the tiny bases and the shapes images are built into it once (warm-up).
        os.environ["MULTIMODAL_LORA_CACHE"] = str(Path(tmp) / "cache")
        features = Path(tmp) / "cache" / "features"
        from multimodal_lora.config import load_recipe
        from multimodal_lora.training import train

        for name in args.recipes:
            train(load_recipe(ROOT / "recipes" / f"{name}.yaml", [f"output_dir={Path(tmp) / 'warmup'}", "overwrite=true", "train.max_steps=2"]))
            runs[name] = {"pixels": [], "cached": []}
            for _ in range(args.repeats):
                runs[name]["pixels"].append(run(False, Path(tmp) / "plain", [], f"{name}.yaml"))
                shutil.rmtree(features, ignore_errors=True)  # the cached run builds its features
                runs[name]["cached"].append(run(True, Path(tmp) / "cached", [], f"{name}.yaml"))
    summary = {}
    for name, found in runs.items():
        steps = found["pixels"][0]["steps_per_epoch"]
        pixels, cached = (median(r["epoch2_s"] for r in found[k]) for k in ("pixels", "cached"))
        summary[name] = {
            "steps_per_epoch": steps,
            "pixels_steps_per_s": steps / pixels,
            "cached_steps_per_s": steps / cached,
            "speedup": pixels / cached,
            "cache_build_s": median(r["cache_build_s"] for r in found["cached"]),
            "final_loss": {k: found[k][0]["final_loss"] for k in ("pixels", "cached")},
        }
    print(table(
        ["recipe", "steps/epoch", "pixels (steps/s)", "cached (steps/s)", "speed-up", "cache build (s)"],
        [[n, s["steps_per_epoch"], s["pixels_steps_per_s"], s["cached_steps_per_s"], s["speedup"], s["cache_build_s"]]
         for n, s in summary.items()],
        title=f"epoch 2 of 2, median of {args.repeats} alternating run(s), {args.threads} torch thread(s)",
    ))  # fmt: skip
    path = write_result("feature_cache_families", {
        "recipes": [f"recipes/{n}.yaml" for n in runs], "overrides": ["train.epochs=2", "train.eval_captions=false"],
        "repeats": args.repeats, "summary": summary, "runs": runs,
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
