"""How much faster is an epoch when the frozen image features are cached?

    python bench/feature_cache_speedup.py [key=value ...]

Trains recipes/tiny.yaml for two epochs twice, without and with
``train.cache_image_features``, and prints the seconds of each epoch and the
epoch-2 speed-up (epoch 1 of the cached run includes building the cache, into
a fresh cache directory). Validation captioning is off so only training is
timed. Writes bench/results/feature_cache_speedup.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cached: bool, out: Path, extra: list[str]) -> dict:
    from multimodal_lora.config import load_recipe
    from multimodal_lora.train import train

    overrides = [
        f"output_dir={out}",
        "train.epochs=2",
        "train.eval_captions=false",
        f"train.cache_image_features={'true' if cached else 'false'}",
        *extra,
    ]
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", overrides)
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
    }


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh cache root: the cached run must build its features, not find old ones.
        os.environ["MULTIMODAL_LORA_CACHE"] = os.environ.get("MULTIMODAL_LORA_CACHE") or str(Path(tmp) / "cache")
        features = Path(os.environ["MULTIMODAL_LORA_CACHE"]) / "features"
        if features.exists():
            import shutil

            shutil.rmtree(features)
        plain = run(False, Path(tmp) / "plain", extra)
        cached = run(True, Path(tmp) / "cached", extra)
    ratio = plain["epoch2_s"] / cached["epoch2_s"]
    print(f"{'':<24}{'epoch 1 (s)':>12}{'epoch 2 (s)':>12}{'final loss':>12}")
    print(f"{'pixels every step':<24}{plain['epoch1_s']:>12.1f}{plain['epoch2_s']:>12.1f}{plain['final_loss']:>12.4f}")
    print(f"{'cached image features':<24}{cached['epoch1_s']:>12.1f}{cached['epoch2_s']:>12.1f}{cached['final_loss']:>12.4f}")
    print(f"epoch-2 speed-up: {ratio:.2f}x (cache built in {cached['cache_build_s']:.1f} s, counted in epoch 1)")
    result = {
        "recipe": "recipes/tiny.yaml",
        "overrides": ["train.epochs=2", "train.eval_captions=false", *extra],
        "uncached": plain,
        "cached": cached,
        "epoch2_speedup": ratio,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
    }
    path = ROOT / "bench" / "results" / "feature_cache_speedup.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
