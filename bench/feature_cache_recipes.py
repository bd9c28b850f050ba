"""Does the shipped tiny recipe train the same adapter with the frozen-feature cache as without?

    python bench/feature_cache_recipes.py [--recipes tiny-qwen2vl tiny-qwen3vl tiny-smolvlm] [--held-out 60]

Trains each recipe as shipped (``cache_image_features: auto``: on, for its several
epochs) and again with ``train.cache_image_features=false``, then compares the two
adapters tensor by tensor and captions the first ``--held-out`` validation images with
each (exact match against their references, and how many captions agree). Wall
seconds are recorded too, as a by-product: validation and epoch-end captioning are
in them, so ``bench/feature_cache_families.py`` is the speed figure. Writes
``bench/results/feature_cache_recipes.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import quiet, set_threads, table, write_result

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["tiny-qwen2vl", "tiny-qwen3vl", "tiny-smolvlm"]


def compare(name: str, workdir: Path, held_out: int) -> dict:
    from safetensors.torch import load_file

    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.sources import group_references, load_splits
    from multimodal_lora.inference.captioner import Captioner
    from multimodal_lora.training import train

    results, seconds = {}, {}
    for setting in ("auto", "false"):
        overrides = [f"output_dir={workdir / f'{name}-{setting}'}", "train.eval_max_images=8", f"train.cache_image_features={setting}"]
        started = time.perf_counter()
        results[setting] = train(load_recipe(ROOT / "recipes" / f"{name}.yaml", overrides))
        seconds[setting] = time.perf_counter() - started
    groups = group_references(load_splits(load_recipe(ROOT / "recipes" / f"{name}.yaml").data).validation)[:held_out]
    captioner = Captioner(name, device="cpu")
    captions = {}
    for setting, result in results.items():
        captioner.load_adapter(result.adapter_dir, name=setting)
        captions[setting] = captioner.caption([first.image for first, _ in groups], adapter=setting)
    cached, plain = (load_file(results[s].adapter_dir / "adapter_model.safetensors") for s in ("auto", "false"))
    return {
        "cache_built": results["auto"].feature_cache_seconds is not None and results["false"].feature_cache_seconds is None,
        "seconds": seconds,
        "final_loss": {s: r.final_loss for s, r in results.items()},
        "max_abs_adapter_difference": max(float((cached[k] - plain[k]).abs().max()) for k in plain),
        "max_abs_adapter_value": max(float(t.abs().max()) for t in plain.values()),
        "exact_match": {s: sum(c in refs for c, (_, refs) in zip(caps, groups)) for s, caps in captions.items()},
        "same_captions": sum(a == b for a, b in zip(captions["auto"], captions["false"])),
        "held_out": len(groups),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="recipes/<name>.yaml to compare")
    parser.add_argument("--held-out", type=int, default=60, help="validation images captioned with each adapter")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MULTIMODAL_LORA_CACHE"] = str(Path(tmp) / "cache")  # the features are built afresh
        found = {name: compare(name, Path(tmp), args.held_out) for name in args.recipes}
    print(table(
        ["recipe", "max |Δ adapter|", "exact, cached", "exact, pixels", "same captions", "s cached", "s pixels"],
        [[n, r["max_abs_adapter_difference"], r["exact_match"]["auto"], r["exact_match"]["false"],
          f"{r['same_captions']}/{r['held_out']}", r["seconds"]["auto"], r["seconds"]["false"]] for n, r in found.items()],
        title="each tiny recipe as shipped (cache auto: on) and with train.cache_image_features=false",
    ))  # fmt: skip
    path = write_result("feature_cache_recipes", {"recipes": [f"recipes/{n}.yaml" for n in found], "results": found})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
