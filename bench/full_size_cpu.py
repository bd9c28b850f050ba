"""BLIP-2 OPT-2.7B at full size on this CPU: int8 and 4-bit NF4 training, caption reload, merge.

    python bench/full_size_cpu.py                      # the real architecture (about 23 min on 2 idle cores, < 16 GiB)
    python bench/full_size_cpu.py --small --out /tmp/x # a small config, same code (the test runs this)

The architecture is the published ``Salesforce/blip2-opt-2.7b`` config shipped
in the package. Nothing is downloaded, and the model is never held whole in
memory: it is built on the ``meta`` device (shapes, no storage), and each
tensor is materialised with random bf16 values and written into safetensors
shards of about 1 GB, one shard in memory at a time. The tokenizer is the
locally built byte-level BPE of the tiny base, resized with placeholder tokens
to the config's vocabulary (50,304), so every id the model can generate
decodes. Then, for **int8** and for **4-bit NF4**, each in a fresh process so
that its peak resident memory is its own:

* ``train``: ``multimodal_lora.training.train`` — the trainer itself — on
  ``recipes/football.yaml`` pointed at that base and at six bundled images in
  the football data set's format (``image``, ``text``), loaded in int8 / 4-bit
  on the CPU, LoRA r=16 on q_proj and v_proj, ``--steps`` optimizer steps at
  batch 2; the adapter is saved; the in-memory model's greedy tokens for two
  images are kept;
* ``caption``: ``multimodal_lora.caption(images, adapter=DIR)`` in a new
  process, which loads the base the way the adapter records (int8 / 4-bit,
  fp32, cpu); its greedy tokens must equal the in-memory model's;
* ``merge``: ``python -m multimodal_lora.merge --dequantize --dtype bf16``.

Each phase records its seconds, its peak RSS (the kernel's high-water mark,
which also counts the pages of the memory-mapped shards read while loading),
its peak anonymous RSS (sampled twice a second: the memory really held) and
the memory plan's estimate beside it (``multimodal_lora.model.plan``: the training
plan for ``train``, the inference weights for ``caption``, the bf16 weights for
``merge``). A ``train`` phase also records the training loop's own peak RSS,
which the trainer reports (``TrainResult.peak_memory_mb``): the figure the
plan estimates. Writes ``OUT/full_size_cpu.json`` (default ``bench/results/``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import quiet, set_threads, table, write_result

QUANTIZATIONS = ("int8", "4bit")
# The football recipe's LoRA, batch and optimiser; only the steps, length and paths change.
STEPS = 3
MAX_LENGTH = 32
NEW_TOKENS = 5
SHARD_BYTES = 1 << 30
ROWS = 6  # the football data set has six rows


# --- the random base ------------------------------------------------------------------------------


def small_config():
    """A small BLIP-2 with the real one's structure and special-token layout (for tests)."""
    from transformers import Blip2Config, OPTConfig
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    qformer = Blip2QFormerConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=64,
        cross_attention_frequency=1,
    )
    text = OPTConfig(
        vocab_size=2048,
        hidden_size=128,
        word_embed_proj_dim=128,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        eos_token_id=2000,
        bos_token_id=2,
        pad_token_id=1,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=2001,
    )


def random_tensor(name: str, shape, generator):
    """What a fresh model would hold: N(0, 0.02) weights, unit norm scales, zero biases."""
    import torch

    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and "norm" in name and leaf == "weight":
        return torch.ones(shape, dtype=torch.bfloat16)
    if leaf == "bias":
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def save_random_base(config, directory: Path, shard_bytes: int = SHARD_BYTES) -> dict:
    """A random bf16 checkpoint of ``config`` with processor, never more than one shard in memory.

    Returns:
        ``{"parameters": ..., "shards": ...}``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from multimodal_lora.model.base import meta_model

    directory.mkdir(parents=True, exist_ok=True)
    model = meta_model(config)  # shapes only: no storage
    unique, every = dict(model.named_parameters()), dict(model.named_parameters(remove_duplicate=False))
    # Persistent buffers and each parameter once (the tied output head is the input embedding).
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in unique or k not in every}
    del model, unique, every
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, count = {}, {}, 0, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for key, shape in shapes.items():
        tensor = random_tensor(key, shape, generator)
        shard[key] = tensor
        size += tensor.numel() * tensor.element_size()
        count += tensor.numel()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    total = len(set(weight_map.values()))
    renamed = {}
    for index in range(1, total + 1):
        old = directory / f"model-{index:05d}.safetensors"
        new = f"model-{index:05d}-of-{total:05d}.safetensors"
        old.rename(directory / new)
        renamed[old.name] = new
    index = {"metadata": {"total_size": 2 * count}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = "bfloat16"
    config.save_pretrained(directory)
    text = config.text_config
    # BLIP-2 OPT stops at "\n" (50118), which is the text config's eos; BOS is </s>.
    GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    ).save_pretrained(directory)
    build_processor(config).save_pretrained(directory)
    return {"parameters": count, "shards": total}


def build_processor(config):
    """The tiny base's locally built tokenizer, resized to the config's vocabulary, and BLIP-2's image processor."""
    from transformers import Blip2Processor, BlipImageProcessor

    from multimodal_lora.families.blip2_opt import build_tokenizer

    tokenizer = build_tokenizer()
    vocab = config.text_config.vocab_size
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(vocab - len(tokenizer))])
    assert len(tokenizer) == vocab, (len(tokenizer), vocab)
    size = config.vision_config.image_size
    # BLIP-2's own preprocessing: bicubic resize, OpenAI CLIP mean and std.
    image_processor = BlipImageProcessor(
        size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=config.num_query_tokens
    )


def save_football_like_data(directory: Path, rows: int = ROWS) -> list[str]:
    """Six bundled images with captions, in the football data set's columns (``image``, ``text``).

    With ``datasets`` installed, saved as the football data set is (a
    ``DatasetDict`` with one ``train`` split, images embedded); without it (a
    GPU image that lacks it), as ``train.jsonl`` rows with the same two columns
    beside copies of the images. ``data.path`` is ``directory`` in the first case
    and ``directory/train.jsonl`` in the second (see :func:`data_path`).

    Returns:
        The image files, for captioning.
    """
    from multimodal_lora.data.shapes import ensure_builtin

    shapes = ensure_builtin("shapes") / "train"
    records = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()[:rows]]
    paths = [str(shapes / r["file_name"]) for r in records]
    try:
        from datasets import Dataset, DatasetDict, Features, Image, Value
    except ImportError:
        directory.mkdir(parents=True, exist_ok=True)
        lines = []
        for path, record in zip(paths, records):
            shutil.copy(path, directory / Path(path).name)
            lines.append(json.dumps({"image": Path(path).name, "text": record["text"]}))
        (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
        return paths
    features = Features({"image": Image(), "text": Value("string")})
    # The image bytes are embedded, as in a hub data set, so the directory stands alone.
    images = [{"bytes": Path(p).read_bytes(), "path": None} for p in paths]
    data = Dataset.from_dict({"image": images, "text": [r["text"] for r in records]}, features=features)
    DatasetDict({"train": data}).save_to_disk(str(directory))
    return paths


def data_path(directory: Path) -> Path:
    """What ``data.path`` names for a directory written by :func:`save_football_like_data`."""
    manifest = directory / "train.jsonl"
    return manifest if manifest.is_file() else directory


# --- the phases (each in its own process unless --in-process) ---------------------------------------


def phase_train(work: Path, quantization: str, steps: int, max_length: int, new_tokens: int) -> dict:
    """The trainer on the football recipe, on the random base in ``quantization``; greedy tokens of the result."""
    from multimodal_lora.adapter import read_adapter
    from multimodal_lora.config import load_recipe
    from multimodal_lora.inference.captioner import Captioner
    from multimodal_lora.model.base import count_parameters
    from multimodal_lora.training import train

    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "football.yaml",
        [
            f"output_dir={work / f'run-{quantization}'}", f"model.base={work / 'base'}", f"model.quantization={quantization}",
            "model.dtype=fp32", "model.device=cpu", f"data.path={data_path(work / 'data')}", f"data.max_length={max_length}",
            f"train.max_steps={steps}", "train.eval_captions=false", "train.log_every=1",
        ],
    )  # fmt: skip
    result = train(recipe)
    model = result.model
    model.eval()  # LoRA dropout off, as in the reloaded model
    counts = count_parameters(model)
    _, meta = read_adapter(result.adapter_dir)
    captioner = Captioner.from_model(model, _processor(work), meta.base, {"default": meta})
    images = json.loads((work / "images.json").read_text())[:2]
    return {
        "adapter": str(result.adapter_dir),
        "total_parameters": counts["total"][1],
        "trainable_parameters": counts["total"][0],
        "base_parameters": counts["total"][1] - counts["total"][0],
        "final_loss": result.final_loss,
        # Peak resident memory from the loop's first step to the adapter on disk (the plan's
        # figure); the phase's peak_rss_bytes also has the load's memory-mapped shards.
        "loop_peak_rss_bytes": int(result.peak_memory_mb * 2**20),
        "steps": result.steps,
        "greedy_tokens": greedy_tokens(captioner, "default", images, new_tokens),
        "captions": captioner.caption(images, adapter="default", max_new_tokens=new_tokens),
        "record": json.loads((result.adapter_dir / "multimodal_lora.json").read_text())["load"],
    }


def phase_caption(work: Path, quantization: str, new_tokens: int) -> dict:
    """``caption(images, adapter=DIR)`` in a fresh process: the base as the adapter records it."""
    from multimodal_lora import caption
    from multimodal_lora.inference.captioner import CAPTIONERS, clear_cache

    clear_cache()  # with --in-process, the other phase's base
    adapter = work / f"run-{quantization}" / "adapter"
    images = json.loads((work / "images.json").read_text())[:2]
    captions = caption(images, adapter=adapter, max_new_tokens=new_tokens)
    (captioner,) = CAPTIONERS.values()
    layer = captioner.model.get_base_model().language_model.model.decoder.layers[0].self_attn.k_proj
    return {
        "captions": captions,
        "greedy_tokens": greedy_tokens(captioner, str(adapter.resolve()), images, new_tokens),
        "loaded_as": captioner.settings.describe(),
        "layer_class": type(layer).__name__,
    }


def phase_merge(work: Path, quantization: str) -> dict:
    """``python -m multimodal_lora.merge --dequantize --dtype bf16`` (the CLI's ``main``, in this process)."""
    from multimodal_lora.commands.merge import main

    out = work / f"merged-{quantization}"
    adapter = work / f"run-{quantization}" / "adapter"
    code = main(["--adapter", str(adapter), "--out", str(out), "--dequantize", "--dtype", "bf16", "--overwrite"])
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out)  # 7.5 GB at full size: measured, then removed
    return {"exit_status": code, "files": files, "bytes": size}


def greedy_tokens(captioner, adapter: str, images: list[str], new_tokens: int) -> list[list[int]]:
    """The ids ``caption()`` decodes: the Captioner's own inputs and greedy ``generate``."""
    import torch

    from multimodal_lora.data.images import load_image

    meta = captioner.adapters[adapter]
    prompt = "" if meta is None or meta.prompt is None else meta.prompt
    batch = captioner.generation_inputs([load_image(i) for i in images], [prompt] * len(images))
    with torch.no_grad(), captioner.using(adapter):
        out = captioner.model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, num_beams=1)
    return out[:, batch["input_ids"].shape[1] :].tolist()


def _processor(work: Path):
    from multimodal_lora.model.base import load_processor

    return load_processor(str(work / "base"))


class AnonymousPeak:
    """Samples this process's anonymous resident memory (``RssAnon``) twice a second and keeps the peak.

    ``ru_maxrss`` also counts file pages: the safetensors shards are memory-mapped,
    and the pages read while loading count as resident although the kernel can
    drop them at any time. The anonymous peak is the memory really held.
    """

    def __init__(self, interval: float = 0.5):
        import threading

        self.peak, self.hwm, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(interval)

    def sample(self) -> None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
                elif line.startswith("VmHWM:"):
                    self.hwm = max(self.hwm, int(line.split()[1]) * 1024)
        except OSError:  # not Linux: no figure
            pass

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


def run_phase(name: str, work: Path, args) -> dict:
    """Run one phase here and add its seconds, this process's peak RSS and its peak anonymous RSS."""
    quiet()
    set_threads(args.threads)
    anonymous = AnonymousPeak()
    start = time.perf_counter()
    kind, _, quantization = name.partition("-")
    if kind == "build":
        config = small_config() if args.small else _published()
        found = save_random_base(config, work / "base")
        images = save_football_like_data(work / "data")
        (work / "images.json").write_text(json.dumps(images))
    elif kind == "train":
        found = phase_train(work, quantization, args.steps, args.max_length, args.new_tokens)
    elif kind == "caption":
        found = phase_caption(work, quantization, args.new_tokens)
    elif kind == "merge":
        found = phase_merge(work, quantization)
    else:
        raise ValueError(name)
    found["seconds"] = time.perf_counter() - start
    found["peak_anonymous_rss_bytes"] = anonymous.stop()
    # The trainer restarts the kernel's peak when its loop begins (to report the loop's own);
    # the sampled high-water marks keep the phase's, loading included. (Not ru_maxrss: it also
    # keeps the size this process had before exec, the bench parent's.)
    found["peak_rss_bytes"] = anonymous.hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux
    return found


def _published():
    from multimodal_lora.model.base import published_config

    return published_config()


def plans(config, args) -> dict:
    """The memory plan beside each phase: training, inference weights, bf16 weights for the merge."""
    from multimodal_lora.config import LoraSettings, load_recipe
    from multimodal_lora.model.base import meta_model
    from multimodal_lora.model.plan import base_weight_bytes, plan_memory

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "football.yaml")
    lora = LoraSettings(**{**recipe.lora.__dict__})
    model = meta_model(config)
    out = {"build": None}
    for q in QUANTIZATIONS:
        plan = plan_memory(
            config,
            quantization=q,
            dtype="fp32",
            lora=lora,
            batch_size=recipe.train.batch_size,
            max_length=args.max_length,
        )
        out[f"train-{q}"] = plan.total(False)
        out[f"caption-{q}"] = base_weight_bytes(model, q, "fp32", for_training=False)
        out[f"merge-{q}"] = base_weight_bytes(model, "none", "bf16", for_training=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a small config (seconds; for tests)")
    parser.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    parser.add_argument(
        "--work", default=None, help="working directory for the checkpoint and runs (default: a temporary one, removed)"
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per training phase")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="text tokens per example")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="greedy tokens compared per image")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue's budget: 2 cores)")
    parser.add_argument(
        "--in-process", action="store_true", help="run the phases in this process (no per-phase RSS; for tests)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="with --work: keep the phases an earlier run there finished (delete a phase's JSON to redo it)"
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:  # a child: run one phase, keep its JSON in the work directory and print it as the last line
        found = run_phase(args.phase, Path(args.work), args)
        (Path(args.work) / f"phase-{args.phase}.json").write_text(json.dumps(found, indent=1))
        print(json.dumps(found))
        return 0

    import tempfile

    quiet()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="full-size-cpu-"))
    names = ["build"] + [f"{kind}-{q}" for q in QUANTIZATIONS for kind in ("train", "caption", "merge")]
    phases, started = {}, time.perf_counter()
    try:
        for name in names:
            done = work / f"phase-{name}.json"
            if args.resume and done.is_file():  # finished by an earlier run in this --work
                phases[name] = json.loads(done.read_text())
            elif args.in_process:
                phases[name] = run_phase(name, work, args)
            else:
                phases[name] = _child(name, work, args)
            found = phases[name]
            print(
                f"{name}: {found['seconds']:.0f} s, peak RSS {found['peak_rss_bytes'] / 2**30:.2f} GiB, "
                f"anonymous {found['peak_anonymous_rss_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
            # What is done so far survives a run stopped part-way.
            write_result(
                "full_size_cpu_small" if args.small else "full_size_cpu",
                {"complete": False, "phases": phases},
                args.out,
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    total_seconds = time.perf_counter() - started

    config = small_config() if args.small else _published()
    planned = plans(config, args)
    for name, found in phases.items():
        found["planned_bytes"] = planned[name]
    problems = []
    for q in QUANTIZATIONS:
        if phases[f"caption-{q}"]["greedy_tokens"] != phases[f"train-{q}"]["greedy_tokens"]:
            problems.append(f"{q}: caption() reloaded tokens differ from the in-memory model's")
        if phases[f"merge-{q}"]["exit_status"] != 0:
            problems.append(f"{q}: merge failed")
    train = phases["train-int8"]
    gib = 2**30
    print(table(
        ["phase", "seconds", "peak RSS GiB", "anonymous GiB", "loop peak GiB", "plan GiB", "anonymous / plan", "loop / plan"],
        [[n, p["seconds"], p["peak_rss_bytes"] / gib, p["peak_anonymous_rss_bytes"] / gib,
          p["loop_peak_rss_bytes"] / gib if "loop_peak_rss_bytes" in p else "-",
          p["planned_bytes"] / gib if p["planned_bytes"] else "-",
          p["peak_anonymous_rss_bytes"] / p["planned_bytes"] if p["planned_bytes"] else "-",
          p["loop_peak_rss_bytes"] / p["planned_bytes"] if "loop_peak_rss_bytes" in p and p["planned_bytes"] else "-"]
         for n, p in phases.items()],
        title=f"{'small config' if args.small else 'BLIP-2 OPT-2.7B (random weights)'} on the CPU, {args.threads} threads, "
        f"LoRA r=16 q_proj,v_proj, {args.steps} steps at batch 2 × {config.num_query_tokens}+{args.max_length} tokens",
    ))  # fmt: skip
    print(
        f"total {total_seconds / 60:.1f} min; base {train['base_parameters']:,} parameters, {train['trainable_parameters']:,} trainable"
    )
    for q in QUANTIZATIONS:
        print(f"{q}: in memory {phases[f'train-{q}']['greedy_tokens']}, caption() {phases[f'caption-{q}']['greedy_tokens']} "
              f"({phases[f'caption-{q}']['layer_class']}, loaded as {phases[f'caption-{q}']['loaded_as']})")  # fmt: skip
    for problem in problems:
        print(f"PROBLEM: {problem}")
    name = "full_size_cpu_small" if args.small else "full_size_cpu"
    path = write_result(name, {
        "config": "small" if args.small else "Salesforce/blip2-opt-2.7b (published config shipped in the package, random weights)",
        "threads": args.threads, "steps": args.steps, "batch_size": 2, "max_length": args.max_length,
        "total_parameters": train["base_parameters"], "trainable_parameters": train["trainable_parameters"],
        "total_parameters_note": "the base's parameters (the LoRA adapters not included), as the shipped config "
        "(text vocabulary 50,304) builds it",
        "total_seconds": total_seconds, "complete": True, "phases": phases, "problems": problems,
    }, args.out)  # fmt: skip
    print(f"wrote {path}")
    return 1 if problems else 0


def _child(name: str, work: Path, args) -> dict:
    """Run a phase in a fresh Python, so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--phase", name, "--work", str(work), "--steps", str(args.steps),
               "--max-length", str(args.max_length), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]  # fmt: skip
    if args.small:
        command.append("--small")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {name} failed (status {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
