"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through accelerate.

``train.report_to`` names them; :func:`resolve_trackers` checks they are
installed before anything heavy happens (the trainer calls it first), and
:func:`start_trackers` opens their runs with the recipe as the run's config.
:class:`~multimodal_lora.training.logs.RunLog` then sends each ``metrics.jsonl`` record
to ``accelerator.log`` too: ``metrics.jsonl`` stays the source of truth, the
trackers get the same numbers.

Where they write, unless the user's environment says otherwise:

- TensorBoard: ``OUTPUT_DIR/tensorboard/multimodal_lora``.
- W&B: ``OUTPUT_DIR/wandb``; ``WANDB_MODE=offline`` keeps the run on disk
  (``wandb sync`` uploads it later).
- MLflow: a file store in ``OUTPUT_DIR/mlruns`` (``MLFLOW_TRACKING_URI`` picks
  another store or a server).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from multimodal_lora.core.errors import ConfigError

logger = logging.getLogger(__name__)

PROJECT = "multimodal_lora"
"""The W&B project, MLflow experiment and TensorBoard sub-directory of every run."""

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""Tracker name → the module that must import (each is also the name of the package extra)."""


def installed(name: str) -> bool:
    """Whether the tracker's package is importable (without importing it: wandb and mlflow take seconds)."""
    return importlib.util.find_spec(TRACKERS[name]) is not None


def resolve_trackers(report_to: list[str] | str) -> list[str]:
    """The trackers to start: the recipe's list, or every installed one for ``all``.

    Raises:
        ConfigError: a tracker asked for by name is not installed (naming the extra to install).
    """
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name in TRACKERS if installed(name)]
    missing = [name for name in report_to if not installed(name)]
    if missing:
        extras = ",".join(missing)
        raise ConfigError(
            f"train.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
            f"pip install 'multimodal-lora[{extras}]', or remove {'it' if len(missing) == 1 else 'them'} from train.report_to"
        )
    return list(report_to)


def start_trackers(accelerator, names: list[str], output_dir: Path, config: dict, resume_step: int | None) -> None:
    """Open each tracker's run (main process) with ``config`` (the recipe) as its configuration.

    Args:
        accelerator: built with ``log_with=names`` and ``project_dir=OUTPUT_DIR/tensorboard``.
        config: the recipe as a nested mapping; flattened to ``section.key`` scalars.
        resume_step: a resumed run's step; TensorBoard drops what was logged after it.
    """
    if not names:
        return
    output_dir = Path(output_dir).resolve()
    init_kwargs: dict[str, dict] = {}
    if "tensorboard" in names and resume_step is not None:
        init_kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    if "wandb" in names:
        init_kwargs["wandb"] = {"dir": str(output_dir), "name": output_dir.name}
    if "mlflow" in names:
        if not os.environ.get("MLFLOW_TRACKING_URI") and accelerator.is_main_process:
            import mlflow

            # MLflow 3 keeps its file store only on opt-in; a local directory beside the run
            # is what we promise (no server, no database), so opt in for this store only.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((output_dir / "mlruns").as_uri())
        init_kwargs["mlflow"] = {"run_name": output_dir.name}  # the experiment is PROJECT
    accelerator.init_trackers(PROJECT, config=flatten(config), init_kwargs=init_kwargs)
    logger.info("reporting to %s", ", ".join(names))


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"lora": {"r": 16}}`` → ``{"lora.r": 16}``; lists and ``None`` as strings (TensorBoard's hparams and
    MLflow's params take only scalars)."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def tracker_scalars(record: dict) -> dict[str, float]:
    """A ``metrics.jsonl`` record as tracker scalars: ``train/loss``, ``validation/val_loss``, ... (step is the x axis)."""
    split = record["split"]
    return {
        f"{split}/{key}": value
        for key, value in record.items()
        if key not in ("split", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
