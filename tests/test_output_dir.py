"""One output directory, one run: a used directory is refused before anything loads, overwrite and resume
are explicit, a checkpoint is resumed only by its own run, and pruning touches only the run's own checkpoints."""

from __future__ import annotations

import gc
import json
import multiprocessing
import shlex
import shutil
import time
import weakref
from pathlib import Path

import pytest
import yaml

from multimodal_lora.commands import run_cli
from multimodal_lora.commands.train import main
from multimodal_lora.config import load_recipe
from multimodal_lora.core.errors import ConfigError, DataError
from multimodal_lora.training import train
from multimodal_lora.training.checkpoint import CheckpointError, TrainState, find_checkpoints, save_checkpoint
from multimodal_lora.training.run_dir import resume_command

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
WEIGHTS = Path("adapter") / "adapter_model.safetensors"


def quick(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}", f"data.path={data}", "train.batch_size=8", "train.max_steps=3",
        "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.eval_captions=false", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(small_shapes_dir, tmp_path_factory) -> Path:
    """A finished run: checkpoints 2 and 3, and its adapter."""
    out = tmp_path_factory.mktemp("finished run")
    train(load_recipe(TINY, quick(small_shapes_dir, out)))
    assert [p.name for p in find_checkpoints(out)] == ["checkpoint-00000002", "checkpoint-00000003"]
    return out


def test_a_fresh_run_into_a_used_directory_stops_before_loading_anything(finished, small_shapes_dir, tmp_path, capsys):
    out = tmp_path / "runs" / "tiny"
    shutil.copytree(finished, out)
    before = (out / WEIGHTS).read_bytes()
    started = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        run_cli(main, [str(TINY), *quick(small_shapes_dir, out, "lora.r=8")])
    assert info.value.code == 2
    assert time.perf_counter() - started < 5  # no data read, no base loaded
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"output_dir {out} already holds a run (2 checkpoint(s) up to checkpoint-00000003, a finished adapter" in lines[0]
    assert "resume=true" in lines[0] and "overwrite=true" in lines[0] and "another output_dir" in lines[0]
    # The way on that it names is the command as given, overrides and all.
    assert "lora.r=8 resume=true" in lines[0]
    assert (out / WEIGHTS).read_bytes() == before
    assert [p.name for p in find_checkpoints(out)] == ["checkpoint-00000002", "checkpoint-00000003"]


def test_overwrite_replaces_the_previous_run_entirely(finished, small_shapes_dir, tmp_path):
    out = tmp_path / "reused"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine, not the run's")
    old = json.loads((find_checkpoints(out)[-1] / "state.json").read_text())["run_id"]
    result = train(load_recipe(TINY, quick(small_shapes_dir, out, "train.max_steps=2", "overwrite=true")))
    assert result.steps == 2
    states = [json.loads((p / "state.json").read_text()) for p in find_checkpoints(out)]
    # The old run's checkpoint 3 is gone: the new run's own checkpoints 1 and 2 were not pruned in its favour.
    assert [s["step"] for s in states] == [1, 2]
    assert {s["run_id"] for s in states} != {old} and len({s["run_id"] for s in states}) == 1
    assert (out / "notes.txt").read_text() == "mine, not the run's"
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert "overwrite" not in saved  # re-running the saved recipe never deletes the run it describes


def test_overwrite_and_resume_together_are_refused():
    with pytest.raises(ConfigError, match="overwrite: true deletes the run that resume would continue"):
        load_recipe(TINY, ["overwrite=true", "resume=true"])


def test_resume_refuses_a_run_with_other_training_settings(finished, small_shapes_dir, tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(finished, out)
    recipe = load_recipe(TINY, quick(small_shapes_dir, out, "resume=true", "train.lr=1e-3", "train.max_steps=5"))
    with pytest.raises(CheckpointError) as info:
        train(recipe)
    message = str(info.value)
    assert "belongs to a different run" in message
    assert "train.lr: checkpoint has 0.003, this run has 0.001" in message
    assert "total steps (train.epochs / train.max_steps): checkpoint has 3, this run has 5" in message


def test_pruning_touches_only_this_runs_checkpoints(tiny_base, tmp_path):
    import torch

    from multimodal_lora.adapter import AdapterMeta
    from multimodal_lora.config import LoraSettings, ModelConfig
    from multimodal_lora.model.base import add_lora, load_base

    model, base = load_base(ModelConfig(base="tiny", device="cpu"))
    model = add_lora(model, LoraSettings(r=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, meta=AdapterMeta(base=base), keep=2)
    # Another run's checkpoints, at higher steps, in the same directory.
    for step in (50, 60):
        save_checkpoint(tmp_path, TrainState(step=step, run_id="other"), **parts)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, TrainState(step=step, run_id="mine"), **parts)
    names = [p.name for p in find_checkpoints(tmp_path)]
    assert names == ["checkpoint-00000002", "checkpoint-00000003", "checkpoint-00000050", "checkpoint-00000060"]
    # Published like any directory: readable by others.
    newest = find_checkpoints(tmp_path)[1]
    assert newest.stat().st_mode & 0o777 == 0o755
    assert (newest / WEIGHTS).stat().st_mode & 0o777 == 0o644


def test_the_stop_hint_repeats_the_overrides(tmp_path):
    out = tmp_path / "my run.v2"
    recipe = load_recipe(TINY, [f"output_dir={out}", "lr=1e-3", "lora.target_modules=[q_proj, v_proj]", "resume=false"])
    command = resume_command(recipe)
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "multimodal_lora.train", str(TINY)]
    assert words[4:] == [f"output_dir={out}", "lr=1e-3", "lora.target_modules=[q_proj, v_proj]", "resume=true"]
    again = load_recipe(words[3], words[4:])
    assert (again.output_dir, again.train.lr, again.lora.target_modules, again.resume) == (
        str(out), 1e-3, ["q_proj", "v_proj"], True
    )


def test_two_runs_at_once_into_one_directory(tmp_path):
    from multimodal_lora.training.run_dir import exclusive

    with exclusive(tmp_path):
        with pytest.raises(ConfigError, match=f"output_dir {tmp_path} is in use by another training run right now"):
            with exclusive(tmp_path):
                pass
    with exclusive(tmp_path):  # released when the run ends
        pass


def test_a_finished_run_releases_its_directory_although_its_loader_workers_live_on(small_shapes_dir, tmp_path):
    """A DataLoader worker is forked while the run holds the lock; the next run in this process still gets it."""
    overrides = quick(small_shapes_dir, tmp_path, "train.cache_image_features=false", "data.num_workers=1")
    first = train(load_recipe(TINY, overrides))
    again = train(load_recipe(TINY, [*overrides, "overwrite=true"]))  # the same process, the same directory
    assert first.steps == again.steps == 3


def test_a_run_spares_the_collector_what_existed_before_it_and_gives_it_back(finished, small_shapes_dir, tmp_path):
    """While a run loads and trains, Python's collections skip the objects that existed before it
    (imports: millions on a real setup); after it, finished or refused, they are collected as usual."""
    gc.collect()
    assert gc.get_freeze_count() == 0
    frozen_during_collections, garbage_gone = [], []

    class Cycle:
        pass

    garbage = Cycle()
    garbage.itself = garbage  # unreachable once deleted: only a collection frees it
    gone = weakref.ref(garbage)
    del garbage

    def spy(phase, info):
        if phase == "start":
            frozen_during_collections.append(gc.get_freeze_count())
        else:
            garbage_gone.append(gone() is None)

    gc.callbacks.append(spy)
    try:
        train(load_recipe(TINY, quick(small_shapes_dir, tmp_path / "run", "data.num_workers=1")))
        during = list(frozen_during_collections)
        # Its loader's worker ended with it, not in some later collection (where that took 5 s).
        assert not [p for p in multiprocessing.active_children() if p.name.startswith("Process")]
        # Garbage from before the run is collected, not frozen and kept through it.
        assert garbage_gone[-1]
        assert gc.get_freeze_count() == 0
        with pytest.raises(ConfigError):  # a used directory
            train(load_recipe(TINY, quick(small_shapes_dir, finished)))
        assert gc.get_freeze_count() == 0
        (tmp_path / "no data").mkdir()
        recipe = load_recipe(TINY, quick(tmp_path / "no data", tmp_path / "bad"))
        with pytest.raises(DataError):  # a run that fails once it has started: its data folder is empty
            train(recipe)
        assert gc.get_freeze_count() == 0
    finally:
        gc.callbacks.remove(spy)
    # From the moment the run froze them (after collecting what was garbage already), every collection skips them.
    frozen = during[next(i for i, count in enumerate(during) if count) :]
    assert len(frozen) > 1 and min(frozen) > 10_000
