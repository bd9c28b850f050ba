"""Checkpoints and resume: kill -9 and SIGTERM mid-run, resume, and get the same adapter bit for bit."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multimodal_lora.commands import run_cli
from multimodal_lora.commands.train import main
from multimodal_lora.config import load_recipe
from multimodal_lora.training import train
from multimodal_lora.training.checkpoint import (
    CheckpointError,
    find_checkpoints,
    latest_checkpoint,
    resolve_resume,
    safe_load,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
WEIGHTS = Path("adapter") / "adapter_model.safetensors"


TOTAL_STEPS = 9


def small_overrides(data: Path, out: Path) -> list[str]:
    # 24 images, micro-batches of 4, 2 per step: 3 steps per epoch, 9 in all; LoRA dropout on,
    # so the random state matters; a checkpoint after every step, so a kill often lands in a write.
    return [
        f"output_dir={out}",
        f"data.path={data}",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.epochs=3",
        "train.log_every=1",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=3",
        "train.eval_max_new_tokens=6",
        "lora.dropout=0.1",
    ]


def start(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "multimodal_lora.train", str(TINY), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early:\n{proc.communicate()[1][-3000:]}"
        path = out / "metrics.jsonl"
        if path.is_file():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def train_losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if r["split"] == "train"]


@pytest.fixture(scope="module")
def reference_run(small_shapes_dir, tmp_path_factory) -> Path:
    """The same recipe, never interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(load_recipe(TINY, small_overrides(small_shapes_dir, out)))
    assert result.steps == TOTAL_STEPS and not result.stopped_early
    return out


def test_sigkill_then_resume_gives_the_same_adapter_bitwise(reference_run, small_shapes_dir, tmp_path):
    out = tmp_path / "killed"
    # At least 4 steps (each with a checkpoint write, two with a validation) remain after
    # the kill point, so the run is still going when the kill lands on a fast machine.
    kill_at = random.Random().randint(2, TOTAL_STEPS - 4)
    proc = start(small_overrides(small_shapes_dir, out))
    wait_for_step(out, kill_at, proc)
    time.sleep(random.Random().uniform(0, 0.05))  # land anywhere in the step, a checkpoint write included
    assert proc.poll() is None, "the run finished before the kill: the test needs more steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # Whatever the kill interrupted, every directory resume would consider is complete.
    visible = find_checkpoints(out)
    assert visible, "no checkpoint was written before the kill"
    for path in visible:
        verify_checkpoint(path)
    assert not (out / "adapter").exists()

    resumed = start([*small_overrides(small_shapes_dir, out), "resume=true"])
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resumed from" in stderr
    assert (out / WEIGHTS).read_bytes() == (reference_run / WEIGHTS).read_bytes(), f"killed at step {kill_at}"
    assert train_losses(out) == train_losses(reference_run)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_sigterm_checkpoints_at_a_step_boundary_and_exits_cleanly(reference_run, small_shapes_dir, tmp_path):
    out = tmp_path / "stopped"
    proc = start(small_overrides(small_shapes_dir, out))
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM received" in stderr
    # The hint is the command as started, overrides and all (output_dir first), plus resume=true.
    hint = shlex.split(stderr.split("Continue with: ")[1].splitlines()[0])
    assert hint == ["python", "-m", "multimodal_lora.train", str(TINY), *small_overrides(small_shapes_dir, out), "resume=true"]
    stopped_at = max(step for step, _ in train_losses(out))
    assert stopped_at < TOTAL_STEPS
    assert find_checkpoints(out)[-1].name == f"checkpoint-{stopped_at:08d}"
    assert not (out / "adapter").exists(), "an unfinished run must not look finished"

    result = train(load_recipe(hint[3], hint[4:]))
    assert result.steps == TOTAL_STEPS
    assert (out / WEIGHTS).read_bytes() == (reference_run / WEIGHTS).read_bytes()


def test_resume_refuses_a_checkpoint_of_another_recipe(reference_run, small_shapes_dir, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(reference_run, out)
    recipe = load_recipe(TINY, [*small_overrides(small_shapes_dir, out), "resume=true", "lora.r=8", "lora.target_modules=[q_proj,v_proj]"])
    with pytest.raises(CheckpointError) as info:
        train(recipe)
    message = str(info.value)
    assert "belongs to a different run" in message
    assert "lora.r: checkpoint has 16, this run has 8" in message
    assert "lora.target_modules" in message
    assert "data.path" not in message


def test_resume_true_without_a_checkpoint_says_so(small_shapes_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(main, [str(TINY), f"output_dir={tmp_path}", "resume=true"])
    assert info.value.code == 2
    assert "has no checkpoint to resume from" in capsys.readouterr().err


def test_a_corrupt_newest_checkpoint_is_named_and_skipped(reference_run, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(reference_run, out)
    newest, previous = find_checkpoints(out)[-1], find_checkpoints(out)[-2]
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a truncated copy
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest}.*optimizer.pt"):
        path, record = latest_checkpoint(out)
    assert path == previous and record["step"] == int(previous.name.split("-")[1])
    # A temporary directory left by a kill mid-write is never a candidate.
    (out / "checkpoints" / ".tmp-checkpoint-abc").mkdir()
    assert all(not p.name.startswith(".") for p in find_checkpoints(out))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_a_pickle_that_would_run_code_is_refused(reference_run, tmp_path, monkeypatch):
    out = tmp_path / "evil"
    shutil.copytree(reference_run, out)
    monkeypatch.chdir(tmp_path)
    newest = find_checkpoints(out)[-1]
    (newest / "optimizer.pt").write_bytes(pickle.dumps({"state": _RunsCode()}))
    with pytest.raises(CheckpointError, match="refused to load.*weights_only=True"):
        safe_load(newest / "optimizer.pt")
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(small_shapes_dir, tmp_path, monkeypatch, capsys):
    import torch

    import multimodal_lora.training.checkpoint as checkpoint

    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # optimizer, scheduler, rng of the first checkpoint fit; then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_full)
    out = tmp_path / "full"
    args = [str(TINY), *small_overrides(small_shapes_dir, out), "train.checkpoint_every=2", "train.max_steps=4"]
    with pytest.raises(SystemExit) as info:
        run_cli(main, args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "could not write checkpoint checkpoint-00000003" in lines[0] and "no space left on device" in lines[0]
    assert "checkpoint-00000002 is intact" in lines[0] and "continue with resume=true" in lines[0]
    assert [p.name for p in find_checkpoints(out)] == ["checkpoint-00000002"]
    verify_checkpoint(find_checkpoints(out)[0])
    assert not list((out / "checkpoints").glob(".*"))
    assert resolve_resume(True, out)[0].name == "checkpoint-00000002"


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small_shapes_dir, tmp_path, monkeypatch):
    import torch

    import multimodal_lora.training.recipe as train_module
    from multimodal_lora.training import TrainingError

    real = train_module.forward_inputs
    calls = {"n": 0}

    def poison_third_batch(batch, device, *image_inputs):
        calls["n"] += 1
        inputs = real(batch, device, *image_inputs)
        if calls["n"] == 3 and inputs.get("pixel_values") is not None:
            inputs["pixel_values"] = inputs["pixel_values"] * torch.nan  # a corrupt image, as far as the loss knows
        return inputs

    monkeypatch.setattr(train_module, "forward_inputs", poison_third_batch)
    out = tmp_path / "nan"
    # The poison goes into the pixels, so the image path must run each step (no feature cache).
    overrides = [
        *small_overrides(small_shapes_dir, out), "train.grad_accum=1", "train.checkpoint_every=2",
        "train.cache_image_features=false",
    ]  # fmt: skip
    with pytest.raises(TrainingError, match=r"the loss became nan at step 3.*checkpoint-00000002"):
        train(load_recipe(TINY, overrides))
    assert [p.name for p in find_checkpoints(out)] == ["checkpoint-00000002"]
    verify_checkpoint(find_checkpoints(out)[0])
    assert not (out / "adapter").exists()


def _killed_while_deleting(tmp_path: Path, remover: str) -> Path:
    """Copy a checkpoint-like tree and delete it in a process SIGKILLed at its first file deletion."""
    out = tmp_path / remover
    victim = out / "checkpoints" / "checkpoint-00000002"
    (victim / "adapter").mkdir(parents=True)
    for name in ("state.json", "optimizer.pt", "rng.pt", "adapter/adapter_model.safetensors"):
        (victim / name).write_bytes(b"x" * 4096)
    script = f"""
import os, signal, sys, shutil
from multimodal_lora.core.atomic import remove_tree
def kill_at_first_delete(event, args):
    if event in ("os.remove", "os.unlink"):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(kill_at_first_delete)
{remover}({str(victim)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return out


def test_a_kill_while_pruning_a_checkpoint_leaves_none_half_deleted(tmp_path):
    from multimodal_lora.training.checkpoint import remove_stale_temporaries

    # What plain rmtree leaves: the checkpoint under its real name, with files gone (what resume then tripped on).
    torn = _killed_while_deleting(tmp_path, "shutil.rmtree")
    assert [p.name for p in find_checkpoints(torn)] == ["checkpoint-00000002"]
    with pytest.raises(CheckpointError):
        verify_checkpoint(find_checkpoints(torn)[0])
    # remove_tree renames it aside first: resume sees no checkpoint, and the leftover is cleaned as stale.
    out = _killed_while_deleting(tmp_path, "remove_tree")
    assert find_checkpoints(out) == []
    leftovers = list((out / "checkpoints").iterdir())
    assert [p.name.startswith(".checkpoint-00000002.old-") for p in leftovers] == [True]
    remove_stale_temporaries(out)
    assert list((out / "checkpoints").iterdir()) == []
