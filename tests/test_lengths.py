"""Lengths the base cannot hold are refused before anything long starts, naming the numbers.

The tiny base holds 128 positions (OPT-2.7B: 2048): 32 image query tokens, then text.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from multimodal_lora.config import load_recipe
from multimodal_lora.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def captioner(tiny_base):
    from multimodal_lora import Captioner

    return Captioner("tiny", device="cpu")


@pytest.fixture(scope="module")
def image(shapes_dir):
    return str(sorted((shapes_dir / "validation").glob("*.png"))[0])


def prompt_of(captioner, n: int) -> str:
    text = " ".join(["a"] * n)  # "a", " a", " a", ...: one token each
    assert len(captioner.processor.tokenizer(text, add_special_tokens=False).input_ids) == n
    return text


def test_training_refuses_a_max_length_the_base_cannot_hold_before_loading(small_shapes_dir, tmp_path, monkeypatch):
    import multimodal_lora.training.recipe as training

    loads = []
    real_load = training.LoadedBase.load
    monkeypatch.setattr(training.LoadedBase, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    recipe = load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", f"data.path={small_shapes_dir}", "data.max_length=120"])
    with pytest.raises(ConfigError) as info:
        training.train(recipe)
    assert loads == []  # refused before any weights were loaded
    assert (
        "data.max_length=120: with the 32 image query tokens that is 152 positions, but the base holds 128; "
        "use at most data.max_length=96"
    ) in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluation_lengths_are_checked_too(tiny_base):
    from multimodal_lora.data.check import recipe_length_problems
    from multimodal_lora.model.base import load_processor

    tokenizer = load_processor("tiny").tokenizer
    ok = load_recipe(TINY, ["data.max_length=96", "train.eval_max_new_tokens=95"])
    assert recipe_length_problems(ok, tokenizer) == []
    long = load_recipe(TINY, ["data.max_length=97", "train.eval_max_new_tokens=200"])
    problems = recipe_length_problems(long, tokenizer)
    assert len(problems) == 2
    assert "data.max_length=97" in problems[0] and "at most data.max_length=96" in problems[0]
    assert "train.eval_max_new_tokens=200" in problems[1] and "at most train.eval_max_new_tokens=96" in problems[1]


def test_data_check_never_suggests_more_than_the_base_holds(small_shapes_dir):
    from multimodal_lora.data.check import check_data

    report = check_data(load_recipe(TINY, [f"data.path={small_shapes_dir}", "data.max_length=200"]), progress=False)
    assert report.text_limit == 96
    assert report.fails and "data.max_length=200" in report.failure and "holds 128" in report.failure
    assert report.suggested_max_length <= 96
    text = report.format()
    assert "FAIL: data.max_length=200" in text and "the base holds at most 96 text tokens per example" in text
    good = check_data(load_recipe(TINY, [f"data.path={small_shapes_dir}"]), progress=False)
    assert not good.fails


def test_inference_refuses_a_prompt_and_length_past_the_limit(captioner, image):
    # 32 queries + </s> + 95 prompt tokens = 128 positions: one new token fits (it is never fed back) ...
    assert isinstance(captioner.caption(image, prompt=prompt_of(captioner, 95), max_new_tokens=1), str)
    # ... a second does not.
    with pytest.raises(ConfigError, match=r"the prompt takes 128 positions .* max_new_tokens=2 needs 1 more, but the base holds 128; lower max_new_tokens to at most 1"):
        captioner.caption(image, prompt=prompt_of(captioner, 95), max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"max_new_tokens=500 .* the base holds 128; lower max_new_tokens to at most 96"):
        captioner.caption(image, max_new_tokens=500)
    with pytest.raises(ConfigError, match="shorten the prompt"):
        captioner.ask(image, prompt_of(captioner, 120))
    # The largest length that fits generates without an error.
    assert isinstance(captioner.caption(image, max_new_tokens=96), str)


def test_caption_cli_reports_the_limit_in_one_line(image):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "multimodal_lora.caption", image, "--max-new-tokens", "500"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the prompt takes 33 positions")
    assert "Traceback" not in proc.stderr and "IndexError" not in proc.stderr
