"""Data-parallel training: two CPU processes under `accelerate launch` (gloo)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from multimodal_lora.adapter import read_adapter
from multimodal_lora.inference.captioner import Captioner
from multimodal_lora.training.checkpoint import find_checkpoints

REPO = Path(__file__).resolve().parents[1]


def launch_two_processes(recipe: str, data_dir: Path, out: Path, tmp_path: Path) -> str:
    """Train ``recipe`` on ``data_dir`` for 2 epochs of 3 steps in two CPU processes; check what every
    data-parallel run must leave, and return the launcher's stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    command = [
        # `--cpu --num_processes 2` needs mpirun in accelerate 1.x; --multi_gpu starts torchrun, and the
        # recipe's model.device=cpu makes the processes join over gloo.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "multimodal_lora.train", str(REPO / "recipes" / recipe),
        f"output_dir={out}", f"data.path={data_dir}", "train.batch_size=4", "train.epochs=2",
        "train.log_every=1", "train.eval_max_new_tokens=4", "model.device=cpu",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # 24 images in global batches of 2 × 4: 3 steps per epoch, logged once each by the main process.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert len([r for r in records if r["split"] == "validation"]) == 2
    assert proc.stderr.count("adapter saved to") == 1, "only the main process reports (and writes) the adapter"
    state = json.loads((find_checkpoints(out)[-1] / "state.json").read_text())
    assert state["identity"]["processes"] == 2 and state["samples"] == 48
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary directory was left behind"
    return proc.stderr


@pytest.mark.slow
def test_two_processes_train_and_write_the_adapter_once(small_shapes_dir, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes("tiny.yaml", small_shapes_dir, out, tmp_path)
    directory, meta = read_adapter(out / "adapter")
    assert meta is not None and meta.base.name == "tiny"
    captioner = Captioner("tiny", device="cpu")
    name = captioner.load_adapter(directory)
    assert isinstance(captioner.caption(str(small_shapes_dir / "validation" / "00000.png"), adapter=name), str)


@pytest.mark.slow
def test_two_processes_train_qwen_on_images_of_different_sizes(small_shapes_dir, tmp_path):
    # Qwen2.5-VL counts image tokens per image: with four sizes in turn, each process's batch of 4
    # holds 16-, 12-, 15- and 12-token images, so the two processes' batches differ in length and in
    # patches (pixel_values rows), which the collate and the gathered loss must take.
    from PIL import Image
    from safetensors.torch import load_file

    data = tmp_path / "mixed"
    sizes = [(64, 64), (48, 32), (40, 64), (64, 48)]
    for split in ("train", "validation"):
        (data / split).mkdir(parents=True)
        lines = (small_shapes_dir / split / "metadata.jsonl").read_text().splitlines()
        for index, line in enumerate(lines):
            name = json.loads(line)["file_name"]
            Image.open(small_shapes_dir / split / name).resize(sizes[index % 4]).save(data / split / name)
        (data / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ddp-qwen"
    stderr = launch_two_processes("tiny-qwen2vl.yaml", data, out, tmp_path)
    # The ragged feature cache serves both processes: each image's variable-length features and grid.
    assert "image feature cache: on (cache_image_features=auto" in stderr, stderr

    directory, meta = read_adapter(out / "adapter")
    assert meta is not None and meta.base.name == "tiny-qwen2vl"
    names = load_file(directory / "adapter_model.safetensors")
    assert len(names) == 2 * 4 * 2  # two layers × q/k/v/o × (A, B), all in the language model's attention
    assert all(re.search(r"model\.language_model\.layers\.\d\.self_attn\.[qkvo]_proj\.lora_[AB]", n) for n in names)


@pytest.mark.slow
def test_the_fsdp_config_trains_on_cpu_as_data_parallel_and_saves_a_normal_adapter(small_shapes_dir, tmp_path):
    # accelerate shards with FSDP only on GPUs; launched on CPU processes the same config must still
    # train (over gloo, data-parallel), say so, and write the adapter a one-process run writes.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration

    from multimodal_lora.config import load_recipe
    from multimodal_lora.training import train

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    args = [
        str(REPO / "recipes" / "tiny.yaml"), f"data.path={small_shapes_dir}", "train.batch_size=4", "train.max_steps=2",
        "train.eval_captions=false", "model.device=cpu",
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "examples" / "accelerate" / "fsdp.yaml"),
        "--num_processes", "2", "-m", "multimodal_lora.train", *args, f"output_dir={tmp_path / 'fsdp'}",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "accelerate runs FSDP only on GPUs; these 2 cpu processes train data-parallel" in proc.stderr
    state = json.loads((find_checkpoints(tmp_path / "fsdp")[-1] / "state.json").read_text())
    assert state["identity"]["processes"] == 2 and state["step"] == 2

    single = train(load_recipe(args[0], [*args[1:], f"output_dir={tmp_path / 'one'}"])).adapter_dir
    sharded = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    alone = load_file(single / "adapter_model.safetensors")
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in alone.items()}
    assert json.loads((tmp_path / "fsdp" / "adapter" / "adapter_config.json").read_text()) == json.loads(
        (single / "adapter_config.json").read_text()
    )
    # Plain PEFT loads it.
    base = Blip2ForConditionalGeneration.from_pretrained(read_adapter(single)[1].base.name_or_path)
    PeftModel.from_pretrained(base, str(tmp_path / "fsdp" / "adapter"))
