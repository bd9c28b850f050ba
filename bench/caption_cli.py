"""Captioning validation images through the CLI with its defaults: this checkout against another.

    git worktree add /tmp/baseline 2522186            # the code to compare with (e.g. before issue 12)
    python -m multimodal_lora.train recipes/tiny.yaml  # an adapter (runs/tiny/adapter)
    python bench/caption_cli.py --adapter runs/tiny/adapter --baseline /tmp/baseline [--images 200] [--repeats 3]

Runs the caption CLI (``multimodal_lora.commands.caption.main``, ``--adapter A --out
X.jsonl IMAGE ...``) on the first ``--images`` validation images of the tiny
recipe with each checkout's code and defaults (batch size, merging), in a
fresh process per checkout, alternating, one torch thread each. In each
process the CLI first captions one image (imports, loading the base and the
adapter: the start-up, timed apart), then all the images; the second call is
the captioning throughput (images/s, wall and CPU), the whole process the end
to end figure. The exact match of the captions against the references
(held-out accuracy) is printed for both. Writes ``bench/results/caption_cli.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import median, table, write_result

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5


DRIVER = """
import json, sys, time
try:
    from multimodal_lora.commands.caption import main
except ImportError:  # a baseline checkout from before the commands package
    from multimodal_lora.commands.caption import main
adapter, out, images = sys.argv[1], sys.argv[2], sys.argv[3:]
start, cpu = time.perf_counter(), time.process_time()
main(["--adapter", adapter, "--out", out, images[0]])  # start-up: imports done, base and adapter loaded
startup, startup_cpu = time.perf_counter() - start, time.process_time() - cpu
start, cpu = time.perf_counter(), time.process_time()
main(["--adapter", adapter, "--out", out, *images])  # the same captioner, from the CLI's cache
print(json.dumps({"startup": startup, "startup_cpu": startup_cpu,
                  "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}))
"""


def caption(checkout: Path, adapter: Path, images: list[str], out: Path, threads: int) -> dict:
    """One process of ``checkout``'s CLI: start-up on one image, then ``images``; the timings and captions."""
    env = {
        **os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }  # fmt: skip
    # main() ends with the CLI's exit status as a return value or SystemExit; either is fine here.
    cmd = [sys.executable, "-c", DRIVER, str(adapter), str(out), *images]
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{checkout}: caption failed:\n{done.stderr[-3000:]}")
    timings = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {**timings, "rows": rows}


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
    runs = {name: [] for name in checkouts}
    matches = {}
    with tempfile.TemporaryDirectory(prefix="caption-cli-") as tmp:
        for checkout in checkouts.values():  # warm-up: bytecode compiled, files in the page cache
            caption(checkout, Path(args.adapter), images[:2], Path(tmp) / "warm.jsonl", args.threads)
        for _ in range(args.repeats):
            for name, checkout in checkouts.items():
                found = caption(checkout, Path(args.adapter), images, Path(tmp) / "out.jsonl", args.threads)
                matches[name] = sum(r.get("caption") == references[r["image"]] for r in found.pop("rows")) / len(images)
                runs[name].append(found)
    summary = {}
    for name, found in runs.items():
        summary[name] = {
            "images_per_second": len(images) / median(r["seconds"] for r in found),
            "images_per_cpu_second": len(images) / median(r["cpu_seconds"] for r in found),
            "startup_seconds": median(r["startup"] for r in found),
            "end_to_end_seconds": median(r["startup"] + r["seconds"] for r in found),
            "exact_match": matches[name],
        }
    base = summary["baseline"]
    rows = [
        [
            name, s["images_per_second"], s["images_per_second"] / base["images_per_second"], s["images_per_cpu_second"],
            s["images_per_cpu_second"] / base["images_per_cpu_second"], s["startup_seconds"], s["end_to_end_seconds"],
            s["exact_match"],
        ]
        for name, s in summary.items()
    ]  # fmt: skip
    print(table(
        ["code", "images/s", "× baseline", "images/CPU s", "× baseline (CPU)", "start-up s", "end to end s", "exact match"],
        rows,
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
