"""Experiment trackers through accelerate: W&B offline and MLflow's local store, read back for real."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _train(args: list[str], tmp_path: Path, prelude: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.update(WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"))
    code = f"import sys\n{prelude}\nfrom multimodal_lora.commands.train import cli\nsys.argv = ['train', *{args!r}]\ncli()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def read_wandb_offline_run(path: Path) -> tuple[list[dict], dict]:
    """History rows and config of an offline run's ``run-*.wandb`` file.

    The file is W&B's record log: a 7-byte header (``:W&B``, magic, version), then
    LevelDB-log blocks of 32 KiB whose chunks are crc32 (4 bytes), length (2), type
    (1: full, 2: first, 3: middle, 4: last) and data; each record is a protobuf
    ``wandb.proto.wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, pending, history, config = 32768, 7, b"", [], {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in this block for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            which = record.WhichOneof("record_type")
            if which == "history":
                history.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            elif which == "config":
                for item in record.config.update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return history, config


def test_wandb_offline_and_mlflow_get_the_metrics_and_the_recipe(small_shapes_dir, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    proc = _train(
        [str(REPO / "recipes" / "tiny.yaml"), f"output_dir={out}", f"data.path={small_shapes_dir}", "train.batch_size=4",
         "train.epochs=2", "train.log_every=2", "train.eval_max_new_tokens=4", "model.device=cpu", "report_to=[wandb, mlflow]"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    validation = {r["step"]: r for r in records if r["split"] == "validation"}
    assert sorted(train) == [2, 4, 6, 8, 10, 12] and sorted(validation) == [6, 12]  # 24 images / 4 = 6 steps per epoch

    # W&B: the offline run's own record file holds every logged step's training loss, and the recipe.
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    history, config = read_wandb_offline_run(runs[0])
    logged = {row["_step"]: row for row in history}
    assert {step: row["train/loss"] for step, row in logged.items() if "train/loss" in row} == pytest.approx(
        {step: r["loss"] for step, r in train.items()}
    )
    assert {
        step: row["validation/val_loss"] for step, row in logged.items() if "validation/val_loss" in row
    } == pytest.approx({step: r["val_loss"] for step, r in validation.items()})
    assert config["lora.r"] == 16 and config["data.path"] == str(small_shapes_dir)

    # MLflow: the local file store inside the run directory has one finished run with the same values.
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # reading the store needs the same opt-in as writing it
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("multimodal_lora")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert loss == pytest.approx({step: r["loss"] for step, r in train.items()})
    bleu = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "validation/bleu4")}
    assert bleu == pytest.approx({step: r["bleu4"] for step, r in validation.items()})
    assert run.data.params["lora.r"] == "16" and run.data.params["train.report_to"] == "['wandb', 'mlflow']"


def test_missing_tracker_fails_before_anything_loads_naming_the_extra(tmp_path):
    out = tmp_path / "run"
    # sys.modules[name] = None is how Python spells "this package is not installed here".
    proc = _train([str(REPO / "recipes" / "tiny.yaml"), f"output_dir={out}", "report_to=[mlflow, wandb]"], tmp_path,
                  prelude="sys.modules['wandb'] = None")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: train.report_to: wandb is not installed; pip install 'multimodal-lora[wandb]', or remove it from train.report_to"
    )
    assert not out.exists()  # failed before the output directory, the data or the weights


def test_report_to_all_means_the_installed_ones(monkeypatch):
    from multimodal_lora.training import trackers

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    expected = [name for name in ("wandb", "mlflow") if trackers.installed(name)]
    assert trackers.resolve_trackers("all") == expected
    assert trackers.resolve_trackers("none") == [] and trackers.resolve_trackers([]) == []
    assert trackers.tracker_scalars({"split": "train", "step": 3, "loss": 0.5, "epoch": 0.25}) == {
        "train/loss": 0.5, "train/epoch": 0.25,
    }  # fmt: skip
