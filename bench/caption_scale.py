"""Batch-captioning throughput on 1 and N processes: `python -m multimodal_lora.caption` as users run it.

    python bench/caption_scale.py [--images 2000] [--processes 1,2] [--repeats 2]
    python bench/caption_scale.py --small            # a quick check (the tests run this)

Captions ``--images`` generated PNGs (64×64, one colour each) with the tiny
base and a random LoRA adapter, once per process count and repeat, in
alternating order, through the real command: one process is
``python -m multimodal_lora.caption``, N processes are
``accelerate launch --multi_gpu --num_processes N -m multimodal_lora.caption``
(CPU processes join over gloo; on a GPU machine each process takes one GPU).
Every run's output file must equal the one-process file row for row (same
images, same order, same captions), or the bench fails.

Reported per process count (medians): images/s inside the captioning loop (the
command's own figure: first batch to last row written, all processes) and end
to end (command start to exit: imports, model load, process start-up), and
each as a ratio to one process. On CPU every process runs one torch thread
(``OMP_NUM_THREADS=1``) and ``--num-workers`` DataLoader workers. Writes
``bench/results/caption_scale.json``.

``--engines builtin,vllm`` adds ``caption --engine vllm`` (one process: vLLM
spreads the work itself) beside the built-in engine's runs, on the same images,
adapter and batch size, alternating with them; its output is compared row for
row with the built-in engine's (the count of equal rows is reported, not
required: vLLM's kernels may round differently), and the file is
``bench/results/caption_scale_vllm.json``. Give ``--adapter`` a trained adapter
there: a random one writes text where the two engines' tokenizer decoding
differs (an answer ending inside a multi-byte character).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import median, quiet, table, write_result

REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"in ([\d.]+) s, ([\d.]+) images/s on (\d+) process")


def make_images(root: Path, count: int) -> Path:
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (64, 64), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(images / f"{i:06d}.png")
    return images


def make_adapter(root: Path) -> Path:
    """A LoRA adapter on the tiny base with random B matrices (throughput does not depend on training)."""
    import torch

    from multimodal_lora.adapter import AdapterMeta, save_adapter
    from multimodal_lora.config import LoraSettings, ModelConfig
    from multimodal_lora.model.base import add_lora, load_base

    model, base = load_base(ModelConfig(base="tiny", device="cpu"))
    model = add_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return save_adapter(model, root / "adapter", AdapterMeta(base=base))


def command(processes: int, gpu: bool, args: list[str]) -> list[str]:
    if processes == 1:  # and always with --engine vllm
        return [sys.executable, "-m", "multimodal_lora.caption", *args]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, "-m", "multimodal_lora.caption", *args]


def run_once(engine: str, processes: int, gpu: bool, images: Path, adapter: Path, out: Path, opts) -> dict:
    args = [str(images), "--adapter", str(adapter), "--out", str(out), "--overwrite", "--engine", engine]
    args += ["--batch-size", str(opts.batch_size), "--max-new-tokens", str(opts.max_new_tokens)]
    args += ["--num-workers", str(opts.num_workers)]
    if gpu:
        # The adapter was made on the CPU and records it; under accelerate each process then takes cuda:LOCAL_RANK.
        args += ["--device", "cuda"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    proc = subprocess.run(command(processes, gpu, args), env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{engine}, {processes} process(es) failed:\n{proc.stderr[-3000:]}")
    match = RATE.search(proc.stderr)
    if match is None or int(match.group(3)) != processes:
        raise SystemExit(f"no throughput line from {engine}, {processes} process(es):\n{proc.stderr[-2000:]}")
    rows = out.read_text().splitlines()
    return {"engine": engine, "processes": processes, "loop_seconds": float(match.group(1)), "loop_images_per_s": float(match.group(2)),
            "wall_seconds": wall, "end_to_end_images_per_s": len(rows) / wall, "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument(
        "--processes", default=None, help="comma-separated process counts (default: 1,2; GPUs: 1,N GPUs)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="images per generate call, per process")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers per process")
    parser.add_argument("--small", action="store_true", help="200 images, 1 repeat: a check, not a figure")
    parser.add_argument(
        "--engines", default="builtin", help="builtin, or builtin,vllm: also caption --engine vllm (one process)"
    )
    parser.add_argument("--adapter", type=Path, default=None, help="the adapter to caption with (default: a random one)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    opts = parser.parse_args(argv)
    quiet()
    import torch

    gpu = torch.cuda.is_available()
    if opts.small:
        opts.images, opts.repeats = 200, 1
    if opts.processes:
        counts = [int(c) for c in opts.processes.split(",")]
    else:
        # On one GPU, 2 processes share it (each its own CUDA context and generate loop).
        counts = [1, max(2, torch.cuda.device_count())] if gpu else [1, 2]
    engines = [e.strip() for e in opts.engines.split(",") if e.strip()]
    configs = [("builtin", n) for n in counts] + [("vllm", 1)] * ("vllm" in engines)
    with tempfile.TemporaryDirectory(prefix="caption-scale-") as tmp:
        root = Path(tmp)
        images = make_images(root, opts.images)
        adapter = opts.adapter.resolve() if opts.adapter else make_adapter(root)
        runs = []
        for repeat in range(opts.repeats):
            # Alternate the order, so that no configuration always runs first (cold caches, a busy neighbour).
            for engine, processes in configs if repeat % 2 == 0 else configs[::-1]:
                run = run_once(engine, processes, gpu, images, adapter, root / f"out-{engine}-{processes}.jsonl", opts)
                run["load_average"] = os.getloadavg()[0]
                runs.append(run)
                print(f"  {engine}, {processes} process(es): {run['loop_images_per_s']:.1f} images/s in the loop, "
                      f"{run['end_to_end_images_per_s']:.1f} end to end", file=sys.stderr)  # fmt: skip
    reference = next(r["rows"] for r in runs if r["processes"] == counts[0])
    assert len(reference) == opts.images
    for run in runs:
        rows = run.pop("rows")
        if run["engine"] == "vllm":
            run["rows_equal_to_builtin"] = sum(a == b for a, b in zip(rows, reference))
        elif rows != reference:
            raise SystemExit(f"{run['processes']} processes wrote a different file than {counts[0]}")
    summary = []
    for engine, processes in configs:
        mine = [r for r in runs if r["engine"] == engine and r["processes"] == processes]
        summary.append({
            "engine": engine,
            "processes": processes,
            "loop_images_per_s": median(r["loop_images_per_s"] for r in mine),
            "end_to_end_images_per_s": median(r["end_to_end_images_per_s"] for r in mine),
        })  # fmt: skip
    base_loop, base_e2e = summary[0]["loop_images_per_s"], summary[0]["end_to_end_images_per_s"]
    for row in summary:
        row["loop_speedup"] = row["loop_images_per_s"] / base_loop
        row["end_to_end_speedup"] = row["end_to_end_images_per_s"] / base_e2e
    print(table(
        ["engine", "processes", "loop images/s", "× builtin 1 process", "end-to-end images/s", "× builtin 1 process"],
        [[r["engine"], r["processes"], r["loop_images_per_s"], r["loop_speedup"], r["end_to_end_images_per_s"],
          r["end_to_end_speedup"]] for r in summary],
        title=f"caption {opts.images} images ({'GPU' if gpu else 'CPU, gloo'}), batch {opts.batch_size}/process, "
        f"{opts.max_new_tokens} new tokens, medians of {opts.repeats}; built-in outputs identical across process counts",
    ))  # fmt: skip
    for run in runs:
        if run["engine"] == "vllm":
            print(f"vLLM's file: {run['rows_equal_to_builtin']} of {opts.images} rows equal to the built-in engine's")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items() if k != "out"}
    path = write_result("caption_scale_vllm" if "vllm" in engines else "caption_scale", {"settings": settings, "device": "cuda" if gpu else "cpu",
                                          "summary": summary, "runs": runs}, opts.out)  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
