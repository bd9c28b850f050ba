"""How much faster is an epoch when the frozen image features are cached?

    python bench/feature_cache_speedup.py [--repeats 3] [--threads 1] [key=value ...]

Trains recipes/tiny.yaml for two epochs without and with
``train.cache_image_features``, alternating (pixels, cache, pixels, cache, ...),
and prints the median seconds of each epoch and the epoch-2 speed-up. Every
cached run starts from a fresh cache directory, so its epoch 1 includes
building the cache (all training and validation images). Validation
captioning is off, so only training is timed; one torch thread unless
``--threads`` says otherwise. Writes ``bench/results/feature_cache_speedup.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import median, quiet, set_threads, table, write_result

ROOT = Path(__file__).resolve().parents[1]


def run(cached: bool, out: Path, extra: list[str], recipe_file: str = "tiny.yaml") -> dict:
    """Two epochs of ``recipes/<recipe_file>`` with or without the cache: epoch seconds (epoch 1 with the build)."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.training import train

    overrides = [
        f"output_dir={out}",
        "overwrite=true",
        "train.epochs=2",
        "train.eval_captions=false",
        f"train.cache_image_features={'true' if cached else 'false'}",
        *extra,
    ]
    recipe = load_recipe(ROOT / "recipes" / recipe_file, overrides)
    started = time.perf_counter()
    result = train(recipe)
    total = time.perf_counter() - started
    build = result.feature_cache_seconds or 0.0
    return {
        "epoch1_s": result.epoch_seconds[0] + build,
        "epoch2_s": result.epoch_seconds[1],
        "cache_build_s": build if cached else None,
        "total_s": total,
        "final_loss": result.final_loss,
        "steps_per_epoch": result.steps / 2,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for both runs")
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    runs: dict[str, list[dict]] = {"pixels every step": [], "cached image features": []}
    with tempfile.TemporaryDirectory() as tmp:
        # A private cache root; the tiny base and the shapes images are built into it once (warm-up).
        os.environ["MULTIMODAL_LORA_CACHE"] = str(Path(tmp) / "cache")
        features = Path(tmp) / "cache" / "features"
        from multimodal_lora.config import load_recipe
        from multimodal_lora.training import train

        train(load_recipe(ROOT / "recipes" / "tiny.yaml", [f"output_dir={Path(tmp) / 'warmup'}", "train.max_steps=2"]))
        for _ in range(args.repeats):
            runs["pixels every step"].append(run(False, Path(tmp) / "plain", args.overrides))
            shutil.rmtree(features, ignore_errors=True)  # the cached run must build its features
            runs["cached image features"].append(run(True, Path(tmp) / "cached", args.overrides))
    summary = {
        name: {key: median(r[key] for r in found) for key in ("epoch1_s", "epoch2_s", "total_s")}
        | {"final_loss": found[0]["final_loss"]}
        for name, found in runs.items()
    }
    summary["cached image features"]["cache_build_s"] = median(
        r["cache_build_s"] for r in runs["cached image features"]
    )
    plain, cached = summary["pixels every step"], summary["cached image features"]
    ratio = plain["epoch2_s"] / cached["epoch2_s"]
    print(table(
        ["", "epoch 1 (s)", "epoch 2 (s)", "final loss"],
        [[name, s["epoch1_s"], s["epoch2_s"], s["final_loss"]] for name, s in summary.items()],
        title=f"recipes/tiny.yaml, 2 epochs, median of {args.repeats} alternating runs, {args.threads} torch thread(s)",
    ))  # fmt: skip
    print(f"\nepoch-2 speed-up: {ratio:.2f}x (cache built in {cached['cache_build_s']:.1f} s, counted in epoch 1)")
    path = write_result("feature_cache_speedup", {
        "recipe": "recipes/tiny.yaml", "overrides": ["train.epochs=2", "train.eval_captions=false", *args.overrides],
        "repeats": args.repeats, "summary": summary, "runs": runs, "epoch2_speedup": ratio,
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
