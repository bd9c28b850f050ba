"""Recipes: every shipped one loads; every mistake is named with what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from multimodal_lora.config import load_recipe, parse_yaml
from multimodal_lora.core.errors import ConfigError

from .conftest import RECIPES, REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.source == str(path)
    assert recipe.lora.r >= 1


def test_football_recipe_is_the_published_setup():
    recipe = load_recipe(RECIPES / "football.yaml")
    assert recipe.model.base == "Salesforce/blip2-opt-2.7b"
    assert recipe.model.quantization == "int8"
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (16, 32, 0.05)
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.lr == 5e-5
    assert recipe.data.path == "ybelkada/football-dataset"
    assert "memoris" in (RECIPES / "football.yaml").read_text().lower()


def test_scientific_notation_is_a_float(tmp_path):
    # PyYAML's YAML 1.1 resolver reads 1e-4 as the string "1e-4"; recipes use YAML 1.2 numbers.
    recipe = load_recipe(write(tmp_path, "train:\n  lr: 1e-4\n"))
    assert recipe.train.lr == pytest.approx(1e-4)
    assert isinstance(recipe.train.lr, float)


def test_misspelt_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, "lora:\n  rnak: 8\n"))
    assert "lora.rnak" in str(err.value)
    assert "did you mean lora.r?" in str(err.value)


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"outptu_dir: unknown key \(did you mean output_dir\?\)"):
        load_recipe(write(tmp_path, "outptu_dir: x\n"))


def test_bad_values_are_all_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, "lora:\n  r: -1\ntrain:\n  batch_size: 0\nmodel:\n  quantization: int4\n"))
    message = str(err.value)
    assert "lora.r: must be a positive integer (got -1)" in message
    assert "train.batch_size: must be at least 1" in message
    assert "model.quantization: expected one of none, int8, 4bit, got 'int4'" in message


def test_wrong_type_names_field_and_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 'three' \(str\)"):
        load_recipe(write(tmp_path, "train:\n  epochs: three\n"))


def test_unknown_target_module(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, "lora:\n  target_modules: [q_proj, fc1]\n"))
    assert "no 'fc1'" in str(err.value)
    assert "q_proj, k_proj, v_proj, out_proj" in str(err.value)


def test_python_tags_are_refused_never_run(tmp_path):
    marker = tmp_path / "pwned"
    text = f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ConfigError, match="refused to load"):
        load_recipe(write(tmp_path, text))
    assert not marker.exists()


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n")
    recipe = load_recipe(path, ["lora.r=8", "lr=1e-4", "quantization=int8", "output_dir=runs/x", "lora.target_modules=[q_proj]"])
    assert recipe.lora.r == 8
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.model.quantization == "int8"
    assert recipe.output_dir == "runs/x"
    assert recipe.lora.target_modules == ["q_proj"]


def test_bad_overrides(tmp_path):
    path = write(tmp_path, "seed: 0\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path, ["lora.rank=8", "nonsense"])
    assert "lora.rank: unknown key (did you mean lora.r?)" in str(err.value)
    assert "override 'nonsense': write it as key=value" in str(err.value)


def test_parse_yaml_rejects_garbage():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_yaml("a: [1, 2", "x.yaml")


def _run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "multimodal_lora.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_errors_are_one_clean_line(tmp_path):
    result = _run_train(str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "error: recipe" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr

    result = _run_train(str(RECIPES / "tiny.yaml"), "lora.rnak=4")
    assert result.returncode == 2
    assert "lora.rnak: unknown key (did you mean lora.r?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_output_dir_that_is_a_file_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = _run_train(str(RECIPES / "tiny.yaml"), f"output_dir={blocker}")
    assert result.returncode == 2
    assert "output_dir" in result.stderr and "is a file" in result.stderr
    assert "Traceback" not in result.stderr
    assert "training" not in result.stderr  # no progress bar: it failed before the loop
