"""The output directory of a training run: every rule about what may be in it, and its lock.

A run writes everything into ``output_dir`` and one directory holds one run. A fresh run
into a directory holding another run's work stops before anything loads
(:func:`check_output_dir`); ``overwrite=true`` deletes exactly :data:`RUN_ARTEFACTS`;
one run at a time holds the directory (:func:`exclusive`). The checkpoints under it
are :mod:`multimodal_lora.training.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import yaml

from multimodal_lora.config import Recipe
from multimodal_lora.core.atomic import WriteError, remove_tree, write_text
from multimodal_lora.core.errors import ConfigError
from multimodal_lora.training.checkpoint import find_checkpoints, remove_stale_temporaries, resolve_resume

logger = logging.getLogger(__name__)

# What a run leaves in its output_dir; `overwrite=true` deletes exactly these.
RUN_ARTEFACTS = ("checkpoints", "adapter", "metrics.jsonl", "loss.png", "tensorboard", "eval", "recipe.yaml")


def prepare_output_dir(path: Path) -> Path:
    """Create the output directory, refusing a path that is a file."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir: {str(path)!r} is a file; choose a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output_dir: cannot create {str(path)!r} ({exc.strerror})") from None
    return path


def check_output_dir(recipe: Recipe, output_dir: Path) -> None:
    """Refuse a fresh run into a directory holding another run's work; say the two ways on.

    Raises:
        ConfigError: ``output_dir`` has checkpoints, an adapter or metrics, and neither
            ``resume`` nor ``overwrite`` is set; or ``resume`` names a checkpoint of
            another directory while this one holds a run.
    """
    checkpoints = find_checkpoints(output_dir)
    found = []
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s) up to {checkpoints[-1].name}")
    if (output_dir / "adapter").exists():
        found.append("a finished adapter in adapter/")
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    if not found or recipe.overwrite:
        return
    rerun = resume_command(recipe, resume=None)
    if recipe.resume is True:
        return
    if recipe.resume is not False:
        inside = Path(recipe.resume).resolve().is_relative_to(output_dir.resolve())
        if inside:
            return
        raise ConfigError(
            f"resume={recipe.resume}: that checkpoint is not in output_dir {output_dir}, which already holds another "
            f"run ({', '.join(found)}); resume it into an empty output_dir=..."
        )
    raise ConfigError(
        f"output_dir {output_dir} already holds a run ({', '.join(found)}); a fresh run there would mix with it. "
        f"Continue that run with: {rerun} resume=true — or start afresh with overwrite=true (deletes it) "
        "or another output_dir=..."
    )


@contextlib.contextmanager
def exclusive(output_dir: Path):
    """Lock ``output_dir`` for the run: a second run started into the same directory stops at once.

    The lock is on the directory itself (``flock``), so nothing is written for it and it goes
    with the process, however that ends. Only the first process of a launch takes it.
    """
    import fcntl

    if os.environ.get("RANK", "0") not in ("", "0"):
        yield
        return
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"output_dir {output_dir} is in use by another training run right now; wait for it to finish, "
                "or choose another output_dir"
            ) from None
        yield
    finally:
        # Unlocked explicitly: forked DataLoader workers share the descriptor, and a worker that
        # outlived the run (_release_workers ends them, but a failed shutdown leaves them) would keep it locked.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def claimed(recipe: Recipe, output_dir: Path):
    """The run's hold on ``output_dir``: locked, checked free of another run's work, and a full disk
    (:class:`~multimodal_lora.core.atomic.WriteError`) told the way on: the last intact checkpoint."""
    try:
        with exclusive(output_dir):
            # Before anything loads: a fresh run never mixes with another run's checkpoints or adapter.
            check_output_dir(recipe, output_dir)
            yield
    except WriteError as exc:
        if exc.hint:
            raise
        last = latest_checkpoint_name(output_dir)
        hint = f"the last intact checkpoint is {last}; free space and continue with resume=true" if last else (
            "no checkpoint was written yet; free space and run again"
        )
        raise exc.with_hint(hint) from None


def start(recipe: Recipe, accelerator, output_dir: Path):
    """Make ``output_dir`` ready for this run: the previous run gone (``overwrite``), stale temporaries
    removed, the recipe as run written; returns the checkpoint to resume from (``None``: a fresh run)."""
    if accelerator.is_main_process:
        if recipe.overwrite:
            clear_previous_run(output_dir)
        remove_stale_temporaries(output_dir)
    accelerator.wait_for_everyone()
    resume = resolve_resume(recipe.resume, output_dir)
    if accelerator.is_main_process:
        # The resolved recipe, overrides applied: what this run really was.
        write_text(output_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False), "the run's recipe")
    return resume


def clear_previous_run(output_dir: Path) -> None:
    """``overwrite=true``: delete the previous run's artefacts (and nothing else in the directory)."""
    removed = []
    for name in RUN_ARTEFACTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)  # a kill meanwhile leaves no half-deleted checkpoint or adapter
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        logger.warning("overwrite=true: deleted the previous run's %s in %s", ", ".join(removed), output_dir)


def resume_command(recipe: Recipe, resume: bool | None = True) -> str:
    """The command that started this run, with its overrides, ending in ``resume=true``."""
    import shlex

    keep = [o for o in recipe.overrides if o.partition("=")[0].strip() not in ("resume", "overwrite")]
    words = ["python", "-m", "multimodal_lora.train", recipe.source or "RECIPE", *keep]
    if resume:
        words.append("resume=true")
    return shlex.join(words)


def latest_checkpoint_name(output_dir: Path) -> str | None:
    found = find_checkpoints(output_dir)
    return str(found[-1]) if found else None
