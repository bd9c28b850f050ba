"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory ``OUTPUT_DIR/checkpoints/checkpoint-00000120`` (the
optimizer step) holding::

    adapter/            the LoRA weights, as a loadable PEFT adapter
    optimizer.pt        AdamW moments and step counts
    scheduler.pt        the LR scheduler's position
    scaler.pt           the fp16 gradient scaler (only when there is one)
    rng.pt              Python, NumPy, torch (and CUDA) random states
    state.json          step, epoch, position in the epoch's data order, history,
                        what the run is (to refuse a different recipe), and the
                        SHA-256 of every file above

It is written into a hidden temporary directory beside its final place and
renamed into place only when complete, so a crash, a ``kill -9`` or a full disk
mid-write never leaves a directory named ``checkpoint-*`` that is half-written.
``state.json`` is written last and lists each file's hash; a checkpoint whose
files do not match (a truncated copy, a bit flip) is skipped with a warning and
the previous one is used.

``.pt`` files hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from multimodal_lora.adapter import WEIGHTS_FILE, AdapterMeta, adapter_bytes, save_adapter
from multimodal_lora.adapter.search import CHECKPOINTS  # the run layout adapter discovery skips
from multimodal_lora.core.atomic import WriteError, atomic_dir, remove_stale, remove_tree
from multimodal_lora.core.errors import UserError
from multimodal_lora.core.tasks import TASKS

if TYPE_CHECKING:
    from multimodal_lora.config import Recipe

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
_NAME = re.compile(r"checkpoint-(\d{8})")


class CheckpointError(UserError):
    """A checkpoint cannot be written, found, trusted or used for this recipe."""


@dataclass
class TrainState:
    """Where a run is: what a checkpoint records besides tensors."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Epochs completed (the current epoch's index)."""
    batches_done: int = 0
    """Micro-batches of the current epoch already consumed (its data order is fixed by seed and epoch)."""
    samples: int = 0
    """Training examples seen, over all processes."""
    history: list[dict] = field(default_factory=list)
    """Validation results, one entry per evaluation."""
    identity: dict[str, Any] = field(default_factory=dict)
    """What this run is; a checkpoint is only resumed by a run with the same identity."""
    run_id: str = ""
    """Drawn when a run starts afresh, kept when it resumes: which checkpoints are this run's own."""


# --- writing -----------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: Path,
    state: TrainState,
    *,
    model,
    optimizer,
    scheduler,
    scaler,
    meta: AdapterMeta,
    keep: int,
    model_state: dict | None = None,
    card: str | None = None,
) -> Path:
    """Write a checkpoint for ``state.step`` atomically and delete all but the newest ``keep``.

    ``model_state`` is the model's state gathered from a sharded (FSDP) run, for the adapter;
    ``card`` is the adapter's model card (``adapter/README.md``).

    Raises:
        CheckpointError: the checkpoint could not be written (a full disk, no
            permission); the previous checkpoints are left as they were.
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"checkpoint-{state.step:08d}"
    try:
        # The same step written twice (an epoch end that is also a checkpoint step) replaces it.
        previous = find_checkpoints(output_dir)
        # About the size of the last one (all checkpoints of a run hold the same tensors).
        # The first: the adapter and the optimizer's two moments per weight (Adam), and small files.
        needed = (
            sum(p.stat().st_size for p in previous[-1].rglob("*") if p.is_file())
            if previous
            else 3 * adapter_bytes(model, model_state) + len((card or "").encode()) + 64 * 1024
        )
        with atomic_dir(final, f"checkpoint {final.name}", needed=needed) as tmp:
            save_adapter(model, tmp / "adapter", meta, state_dict=model_state, card=card)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            record = asdict(state)
            record["files"] = {name: _sha256(tmp / name) for name in _payload(tmp)}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    except WriteError as exc:
        previous = own_checkpoints(output_dir, state.run_id)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        resume = "continue with resume=true" if previous else "run again"
        raise exc.with_hint(f"{kept}; free disk space (or fix permissions) and {resume}") from None
    # Only this run's checkpoints are pruned: another run's (higher-numbered) ones are never touched.
    for old in own_checkpoints(output_dir, state.run_id)[:-keep]:
        remove_tree(old)
    return final


def own_checkpoints(output_dir: Path, run_id: str) -> list[Path]:
    """The checkpoints written by the run ``run_id``, oldest first."""
    out = []
    for path in find_checkpoints(output_dir):
        try:
            if json.loads((path / STATE_FILE).read_text()).get("run_id") == run_id:
                out.append(path)
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: not provably ours, so never deleted
    return out


def remove_stale_temporaries(output_dir: Path) -> None:
    """Delete staging directories left by a run killed while saving (its checkpoints, its adapter)."""
    remove_stale(output_dir)
    remove_stale(Path(output_dir) / CHECKPOINTS)


# --- finding and reading -------------------------------------------------------------------------


def find_checkpoints(output_dir: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first (temporaries are never listed)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def verify_checkpoint(path: Path) -> dict:
    """Read ``state.json`` and check every file against its recorded hash.

    Returns:
        The state record.

    Raises:
        CheckpointError: naming what is missing or does not match.
    """
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{path}: no {STATE_FILE}; the checkpoint is incomplete")
    try:
        record = json.loads(state_path.read_text())
        files = record["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{state_path}: unreadable ({exc})") from None
    for name, digest in files.items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(path / name) != digest:
            raise CheckpointError(f"{path}: {name} does not match its recorded hash (truncated or corrupt)")
    if "adapter/" + WEIGHTS_FILE not in files:
        raise CheckpointError(f"{path}: no adapter weights recorded")
    return record


def latest_checkpoint(output_dir: Path) -> tuple[Path, dict]:
    """The newest checkpoint that verifies; newer broken ones are named in a warning and skipped.

    Raises:
        CheckpointError: when there is no checkpoint at all, or none that verifies.
    """
    candidates = find_checkpoints(output_dir)
    if not candidates:
        raise CheckpointError(
            f"resume=true: {Path(output_dir) / CHECKPOINTS} has no checkpoint to resume from; "
            "run without resume to start afresh (with overwrite=true if the directory holds another run's adapter)"
        )
    problems = []
    for path in reversed(candidates):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"skipping checkpoint {path}: {exc}; falling back to the previous one", stacklevel=2)
    raise CheckpointError("no usable checkpoint:\n" + "\n".join(f"  - {p}" for p in problems))


def resolve_resume(resume: bool | str, output_dir: Path) -> tuple[Path, dict] | None:
    """Turn the recipe's ``resume`` into a verified checkpoint (or ``None`` for a fresh run)."""
    if resume is False:
        return None
    if resume is True:
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume: {resume!r} is not a checkpoint directory; use resume=true or a checkpoint-* path")
    if not (path / STATE_FILE).exists() and find_checkpoints(path.parent if path.name == CHECKPOINTS else path):
        # A run directory or its checkpoints/ folder: take its newest checkpoint.
        return latest_checkpoint(path.parent if path.name == CHECKPOINTS else path)
    return path, verify_checkpoint(path)


def check_identity(path: Path, saved: dict, current: dict) -> None:
    """Refuse a checkpoint written by a different recipe, listing every difference."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run:\n"
            + "\n".join(f"  - {d}" for d in diffs)
            + "\nResume with the recipe that wrote it (its copy is OUTPUT_DIR/recipe.yaml), or start afresh "
            "with another output_dir (or overwrite=true, which deletes this run)."
        )


def load_checkpoint(path: Path, record: dict, *, model, optimizer, scheduler, scaler) -> TrainState:
    """Restore the adapter, optimizer, scheduler, scaler and random states; return the run state.

    Raises:
        CheckpointError: a ``.pt`` file holds more than tensors and plain values.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter" / WEIGHTS_FILE))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise CheckpointError(f"{path}: the adapter lacks {len(missing)} LoRA weights of this model, e.g. {missing[0]}")
    optimizer.load_state_dict(safe_load(path / "optimizer.pt"))
    scheduler.load_state_dict(safe_load(path / "scheduler.pt"))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(safe_load(path / "scaler.pt"))
    set_rng_state(safe_load(path / "rng.pt"))
    fields = {k: v for k, v in record.items() if k in TrainState.__dataclass_fields__}
    return TrainState(**fields)


def safe_load(path: Path):
    """``torch.load`` that only accepts tensors and plain values; anything executable is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, or whatever the restricted unpickler raises
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain tensor file ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Checkpoint files are read with torch.load(weights_only=True) so that they cannot run code."
        ) from None


# --- random states -------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every random state a run draws from, as tensors and plain values (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` recorded."""
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- files ---------------------------------------------------------------------------------------


def _payload(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != STATE_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_identity(recipe: Recipe, base, splits, processes: int, total_steps: int) -> dict:
    """Everything that changes the trained weights: a checkpoint is resumed only when all of it matches.

    A difference is listed key by key; to change one of these, start a new run (another
    ``output_dir``, or ``overwrite=true``). What does not change the weights (logging,
    checkpoint frequency, evaluation settings, the feature cache, gradient checkpointing,
    ``num_workers``, the device) may change on resume.
    """
    data = hashlib.sha256()
    for e in splits.train:
        data.update(json.dumps([e.image_id, e.target, e.question]).encode())
    return {
        "model.base": recipe.model.base,
        "model.revision": recipe.model.revision,
        "model.quantization": recipe.model.quantization,
        "model.dtype": recipe.model.dtype,
        "base config fingerprint": base.fingerprint,
        "lora.r": recipe.lora.r,
        "lora.alpha": recipe.lora.alpha,
        "lora.dropout": recipe.lora.dropout,
        "lora.target_modules": sorted(recipe.lora.target_modules or ["(the family's default)"]),
        # Only when not the default, so checkpoints from before lora.parts existed still resume.
        **({"lora.parts": sorted(recipe.lora.parts)} if list(recipe.lora.parts) != ["attention"] else {}),
        "data.path": recipe.data.path,
        "data.task": recipe.data.task,
        "data.prompt": recipe.data.prompt,
        "data.prompt_template": recipe.data.prompt_template if TASKS[recipe.data.task].asks else None,
        "data.max_length": recipe.data.max_length,
        "training data (hash of rows)": data.hexdigest()[:16],
        "seed": recipe.seed,
        "train.batch_size": recipe.train.batch_size,
        "train.grad_accum": recipe.train.grad_accum,
        "train.lr": recipe.train.lr,
        "train.weight_decay": recipe.train.weight_decay,
        "train.scheduler": recipe.train.scheduler,
        "train.warmup_ratio": recipe.train.warmup_ratio,
        "train.max_grad_norm": recipe.train.max_grad_norm,
        "total steps (train.epochs / train.max_steps)": total_steps,
        "processes": processes,
    }
