"""Smaller hostile cases: an empty recipe, staging directories left by a kill, file permissions,
a COCO file whose images are all elsewhere, evaluate with the wrong task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from multimodal_lora.config import load_recipe
from multimodal_lora.core.errors import AdapterError, ConfigError, DataError, UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n"])
def test_an_empty_recipe_is_an_error(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"recipe .*recipe.yaml. is empty; .*start from recipes/tiny.yaml"):
        load_recipe(path)


def test_an_empty_recipe_on_the_command_line_is_one_line(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "multimodal_lora.train", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: recipe") and "is empty" in proc.stderr
    assert not (tmp_path / "runs").exists() and not Path("runs/default").exists()


def test_staging_directories_are_refused_as_adapters_and_cleaned(quick_adapter, tmp_path):
    from multimodal_lora.adapter import read_adapter
    from multimodal_lora.core.atomic import is_staging, remove_stale
    from multimodal_lora.training.checkpoint import remove_stale_temporaries

    run = tmp_path / "run"
    # What a save killed midway leaves: a complete-looking copy under a staging name (pid 999999 is not running).
    stale = run / ".adapter-999999-abcd1234"
    shutil.copytree(quick_adapter, stale)
    old_style = run / "checkpoints" / ".tmp-checkpoint-x1y2z3"
    shutil.copytree(quick_adapter, old_style / "adapter")
    live = run / ".adapter-1-live0000"  # a process that runs (pid 1) may be writing it: not touched
    live.mkdir(parents=True)
    assert is_staging(stale) and is_staging(old_style / "adapter") and not is_staging(tmp_path / ".cache" / "run")
    with pytest.raises(AdapterError, match="is a staging directory left by an interrupted save"):
        read_adapter(stale)
    with pytest.raises(AdapterError, match="staging directory"):
        read_adapter(old_style / "adapter")
    remove_stale_temporaries(run)
    assert not stale.exists() and not old_style.exists()
    remove_stale(run)
    assert live.exists()


def test_published_files_are_readable_like_their_directories(quick_adapter, tmp_path):
    from multimodal_lora.merge import merge_adapter

    for path in [quick_adapter, *quick_adapter.iterdir()]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
    merged = merge_adapter(quick_adapter, tmp_path / "merged")
    for path in [merged, *merged.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_coco_with_every_image_missing_names_the_image_dir(small_shapes_dir, tmp_path):
    from multimodal_lora.data.sources import load_splits

    coco = tmp_path / "captions.json"
    names = sorted(p.name for p in (small_shapes_dir / "train").glob("*.png"))[:4]
    coco.write_text(json.dumps({
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [{"image_id": i, "caption": "a shape"} for i in range(len(names))],
    }))  # fmt: skip
    cfg = load_recipe(TINY, [f"data.path={coco}", "data.val_fraction=0.25"]).data
    with pytest.raises(DataError) as info:
        load_splits(cfg)
    message = str(info.value)
    assert f"none of its 4 images exist under the file's own directory {tmp_path} (data.image_dir is not set)" in message
    assert "set data.image_dir to the directory its file names are relative to" in message
    cfg = load_recipe(TINY, [f"data.path={coco}", f"data.image_dir={tmp_path / 'nowhere'}"]).data
    with pytest.raises(DataError, match=rf"under data.image_dir \({tmp_path / 'nowhere'}\)"):
        load_splits(cfg)
    # The right image_dir: it loads.
    cfg = load_recipe(TINY, [f"data.path={coco}", f"data.image_dir={small_shapes_dir / 'train'}"]).data
    assert len(load_splits(cfg).train) == 3


def test_evaluate_refuses_an_adapter_of_another_task(quick_adapter, tmp_path):
    from multimodal_lora.evaluate.run import evaluate

    recipe = load_recipe(REPO / "recipes" / "tiny-vqa.yaml")
    with pytest.raises(UserError, match=r"was trained for task 'caption', but the recipe's data.task is 'vqa'"):
        evaluate(recipe, quick_adapter, tmp_path / "eval", meteor=False)
    assert not (tmp_path / "eval").exists()
