"""Captioning validation images through the CLI with its defaults: this checkout against another.

    git worktree add /tmp/baseline 2522186            # the code to compare with (e.g. before issue 12)
    python -m multimodal_lora.train recipes/tiny.yaml  # an adapter (runs/tiny/adapter)
    python bench/caption_cli.py --adapter runs/tiny/adapter --baseline /tmp/baseline [--images 200] [--repeats 3]

Runs ``python -m multimodal_lora.caption --adapter A --out X.jsonl IMAGE ...`` on
the first ``--images`` validation images of the tiny recipe, with each
checkout's code and defaults (batch size, merging), alternating, one torch
thread each. Reports images/s end to end (process start to file written) and
without the start-up (imports, loading the base and adapter: the time of the
same command on one image, subtracted), and the exact match of the captions
against the references (held-out accuracy, the same for both when the code
only got faster). Writes ``bench/results/caption_cli.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import median, table, write_result

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5


def caption(checkout: Path, adapter: Path, images: list[str], out: Path, threads: int) -> dict:
    env = {
        **os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }  # fmt: skip
    cmd = [sys.executable, "-m", "multimodal_lora.caption", "--adapter", str(adapter), "--out", str(out), *images]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{checkout}: caption failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {
        "seconds": wall,
        "cpu_seconds": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a tiny-recipe adapter directory")
    parser.add_argument("--baseline", required=True, help="a checkout of the code to compare with")
    parser.add_argument("--images", type=int, default=200, help="validation images to caption")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path.insert(1, str(REPO))
    from multimodal_lora.config import load_recipe
    from multimodal_lora.data.sources import load_splits

    examples = load_splits(load_recipe(REPO / "recipes" / "tiny.yaml").data).validation[: args.images]
    images = [e.image for e in examples]
    references = {e.image: e.target for e in examples}
    checkouts = {"this checkout": REPO, "baseline": Path(args.baseline).resolve()}
    runs = {name: {"many": [], "one": []} for name in checkouts}
    matches = {}
    with tempfile.TemporaryDirectory(prefix="caption-cli-") as tmp:
        for checkout in checkouts.values():  # warm-up: imports compiled, files in the page cache
            caption(checkout, Path(args.adapter), images[:1], Path(tmp) / "warm.jsonl", args.threads)
        for _ in range(args.repeats):
            for name, checkout in checkouts.items():
                found = caption(checkout, Path(args.adapter), images, Path(tmp) / "out.jsonl", args.threads)
                matches[name] = sum(r.get("caption") == references[r["image"]] for r in found.pop("rows")) / len(images)
                runs[name]["many"].append(found)
                one = caption(checkout, Path(args.adapter), images[:1], Path(tmp) / "one.jsonl", args.threads)
                one.pop("rows")
                runs[name]["one"].append(one)
    summary = {}
    for name, found in runs.items():
        many, one = median(r["seconds"] for r in found["many"]), median(r["seconds"] for r in found["one"])
        cpu_many, cpu_one = (
            median(r["cpu_seconds"] for r in found["many"]),
            median(r["cpu_seconds"] for r in found["one"]),
        )
        summary[name] = {
            "images_per_second": len(images) / many,
            "images_per_second_after_startup": (len(images) - 1) / max(many - one, 1e-9),
            "images_per_cpu_second": len(images) / cpu_many,
            "images_per_cpu_second_after_startup": (len(images) - 1) / max(cpu_many - cpu_one, 1e-9),
            "startup_seconds": one,
            "exact_match": matches[name],
        }
    base = summary["baseline"]
    rows = [
        [
            name, s["images_per_second"], s["images_per_second"] / base["images_per_second"],
            s["images_per_second_after_startup"], s["images_per_second_after_startup"] / base["images_per_second_after_startup"],
            s["images_per_cpu_second_after_startup"] / base["images_per_cpu_second_after_startup"], s["exact_match"],
        ]
        for name, s in summary.items()
    ]  # fmt: skip
    print(table(
        ["code", "images/s", "× baseline", "images/s after start-up", "× baseline", "× baseline (CPU)", "exact match"], rows,
        title=f"python -m multimodal_lora.caption, defaults, {len(images)} validation images, {args.threads} torch thread(s), "
        f"median of {args.repeats} alternating runs; load average {os.getloadavg()[0]:.1f}",
    ))  # fmt: skip
    path = write_result("caption_cli", {
        "images": len(images), "repeats": args.repeats, "baseline": str(args.baseline), "adapter": str(args.adapter),
        "summary": summary, "runs": runs, "target": TARGET,
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
