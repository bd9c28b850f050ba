"""Data-parallel training: two CPU processes under `accelerate launch` (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from multimodal_lora.adapter import read_adapter
from multimodal_lora.checkpoint import find_checkpoints
from multimodal_lora.inference import Captioner

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_train_and_write_the_adapter_once(small_shapes_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "multimodal_lora.train", str(REPO / "recipes" / "tiny.yaml"),
        f"output_dir={out}", f"data.path={small_shapes_dir}", "train.batch_size=4", "train.epochs=2",
        "train.log_every=1", "train.eval_max_new_tokens=4",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # 24 images in global batches of 2 × 4: 3 steps per epoch, logged once each by the main process.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert len([r for r in records if r["split"] == "validation"]) == 2
    assert proc.stderr.count("\nadapter: ") == 1, "only the main process reports (and writes) the adapter"
    state = json.loads((find_checkpoints(out)[-1] / "state.json").read_text())
    assert state["identity"]["processes"] == 2 and state["samples"] == 48
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary directory was left behind"

    directory, meta = read_adapter(out / "adapter")
    assert meta is not None and meta.base.name == "tiny"
    captioner = Captioner("tiny", device="cpu")
    name = captioner.load_adapter(directory)
    assert isinstance(captioner.caption(str(small_shapes_dir / "validation" / "00000.png"), adapter=name), str)
