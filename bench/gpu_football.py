"""The football recipe end to end on one GPU, on a random full-size BLIP-2 OPT-2.7B saved locally.

    PYTHONPATH=$PWD python bench/gpu_football.py                          # on a GPU (no download)
    PYTHONPATH=$PWD python bench/gpu_football.py --small --out /tmp/x     # anywhere, CPU included: a small config

What a new user does with the real model, without the hub: the published
``Salesforce/blip2-opt-2.7b`` architecture with random weights is written as a
local checkpoint (shard by shard, as ``bench/full_size_cpu.py`` does), and six
bundled images are saved in the football data set's format (a ``train`` split
with ``image`` and ``text`` columns). Then, each as its own command:

1. ``python -m multimodal_lora.train recipes/football.yaml`` pointed at them
   (int8, fp16, device auto: the recipe as shipped), five epochs of three steps;
2. ``caption(images, adapter=runs/football/adapter)`` in this process: the base
   is loaded the way the adapter records (int8, fp16, cuda), checked on the
   layers, and timed;
3. ``accelerate launch --config_file examples/accelerate/fsdp.yaml
   --num_processes 1 -m multimodal_lora.train recipes/football.yaml
   model.quantization=none model.dtype=bf16`` (FSDP shards ordinary tensors, not
   int8 ones), whose adapter must have the shapes of step 1's.

``--small`` runs the same steps on a small config on the CPU (FSDP then falls
back to one data-parallel process: accelerate shards only on GPUs).

On the ``device`` tool's GPU (torch, transformers, peft, accelerate installed;
bitsandbytes carried as a wheel by ``bench/fetch_wheels.sh``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    python3 bench/gpu_football.py --out $OUT

Writes ``OUT/gpu_football.json`` (``gpu_football_small.json`` with ``--small``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from full_size_cpu import data_path, save_football_like_data, save_random_base, small_config
from harness import quiet, write_result

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "football.yaml"


def run(command: list[str], log: Path, env: dict) -> float:
    """Run a command to completion, its output to ``log``; seconds taken. Raises on failure, with the log's tail."""
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed (status {code}):\n{log.read_text()[-4000:]}")
    return time.perf_counter() - start


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def caption_as_recorded(adapter: Path, images: list[str]) -> dict:
    """``caption()`` with nothing but the adapter: how the base was loaded, what it said, how long it took."""
    import torch

    from multimodal_lora import caption
    from multimodal_lora.inference.captioner import CAPTIONERS, clear_cache

    clear_cache()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    first = caption(images[0], adapter=adapter, max_new_tokens=20)
    load_and_first = time.perf_counter() - start
    start = time.perf_counter()
    captions = caption(images, adapter=adapter, max_new_tokens=20)
    batch_seconds = time.perf_counter() - start
    (captioner,) = CAPTIONERS.values()
    layer = captioner.model.get_base_model().language_model.model.decoder.layers[0].self_attn.k_proj
    found = {
        "loaded_as": captioner.settings.describe(),
        "layer_class": type(layer).__name__,
        "first_caption": first,
        "captions": captions,
        "load_and_first_caption_seconds": load_and_first,
        "six_captions_seconds": batch_seconds,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    clear_cache()
    return found


def adapter_shapes(adapter: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a small config on the CPU (for tests)")
    parser.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--skip-fsdp", action="store_true", help="leave out the FSDP launch")
    parser.add_argument(
        "--fsdp-only",
        action="store_true",
        help="only the FSDP launch, in a --work of an earlier run (writes gpu_football_fsdp.json)",
    )
    args = parser.parse_args(argv)
    quiet()
    # What the football steps import; a GPU image running from a checkout may lack some.
    import importlib.util

    import torch

    from multimodal_lora.model.base import published_config

    needed = ["PIL", "yaml", "tqdm", "safetensors", "tokenizers", "peft", "accelerate", "bitsandbytes"]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"error: missing {', '.join(missing)}; install them, or carry their wheels (bench/fetch_wheels.sh)",
            file=sys.stderr,
        )
        return 2
    on_gpu = torch.cuda.is_available()
    if not args.small and not on_gpu:
        print(
            "error: the full-size model needs a CUDA GPU here; use --small for the same steps on a small config",
            file=sys.stderr,
        )
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-football-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    config = small_config() if args.small else published_config()
    device = [] if on_gpu else ["model.device=cpu"]
    result: dict = {"config": "small" if args.small else "Salesforce/blip2-opt-2.7b (published config, random weights)"}

    start = time.perf_counter()
    if not (work / "base" / "config.json").is_file():
        save_random_base(config, work / "base")
    images = save_football_like_data(work / "data") if not (work / "data").exists() else None
    if images is None:
        images = json.loads((work / "images.json").read_text())
    (work / "images.json").write_text(json.dumps(images))
    result["build_seconds"] = time.perf_counter() - start
    print(f"random base and six-row data set in {result['build_seconds']:.0f} s", flush=True)

    football = work / "runs" / "football"
    data = data_path(work / "data")
    result["data"] = str(data.relative_to(work))  # a saved DatasetDict, or train.jsonl where datasets is missing
    if not args.fsdp_only:
        # 1. the football recipe as shipped (int8, fp16, device auto), on the local base and data.
        overrides = [f"output_dir={football}", f"model.base={work / 'base'}", f"data.path={data}", *device]
        seconds = run([sys.executable, "-m", "multimodal_lora.train", str(RECIPE), *overrides], work / "train.log", env)
        records = metrics(football)
        train_rows = [r for r in records if r["split"] == "train"]
        result["football"] = {
            "seconds": seconds,
            "steps": train_rows[-1]["step"],
            "losses": [r["loss"] for r in train_rows],
            "samples_per_second": [r["samples_per_second"] for r in train_rows],
            "peak_memory_mb": max(r.get("peak_memory_mb") or 0 for r in train_rows),
            "record": json.loads((football / "adapter" / "multimodal_lora.json").read_text())["load"],
        }
        print(
            f"football: {result['football']['steps']} steps in {seconds:.0f} s, loss {train_rows[0]['loss']:.3f} -> {train_rows[-1]['loss']:.3f}",
            flush=True,
        )

        # 2. caption() with nothing but the adapter: the base loads as it was trained.
        result["caption"] = caption_as_recorded(football / "adapter", images)
        print(f"caption(): {result['caption']['loaded_as']} on {result['caption']['layer_class']}, "
              f"{result['caption']['load_and_first_caption_seconds']:.1f} s to load and caption one image", flush=True)  # fmt: skip

    # 3. the FSDP config on this machine's one GPU (an unquantized base: FSDP shards plain tensors).
    if not args.skip_fsdp:
        fsdp = work / "runs" / "football-fsdp"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "examples" / "accelerate" / "fsdp.yaml"),
            "--num_processes", "1", "-m", "multimodal_lora.train", str(RECIPE), f"output_dir={fsdp}", f"model.base={work / 'base'}",
            f"data.path={data}", "model.quantization=none", "model.dtype=bf16", "train.epochs=1", *device,
        ]  # fmt: skip
        seconds = run(command, work / "fsdp.log", env)
        log = (work / "fsdp.log").read_text()
        result["fsdp"] = {
            "seconds": seconds,
            "sharded": "accelerate runs FSDP only on GPUs" not in log,
            "steps": [r for r in metrics(fsdp) if r["split"] == "train"][-1]["step"],
            "adapter_shapes_equal_one_process_run": adapter_shapes(fsdp / "adapter")
            == adapter_shapes(football / "adapter"),
        }
        print(f"fsdp: {result['fsdp']}", flush=True)

    result["device"] = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    import transformers

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    name = "gpu_football" + ("_fsdp" if args.fsdp_only else "") + ("_small" if args.small else "")
    path = write_result(name, result, args.out)
    print(f"wrote {path}")
    problems = []
    if (
        "caption" in result
        and result["caption"]["loaded_as"].split(",")[0] != result["football"]["record"]["quantization"]
    ):
        problems.append("caption() did not load the base as the adapter records")
    if "fsdp" in result and result["fsdp"]["adapter_shapes_equal_one_process_run"] is False:
        problems.append("the FSDP run's adapter differs in shape from the one-process run's")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
