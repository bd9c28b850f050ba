"""Adapters that would give wrong output are refused at load, naming the file, the tensor and the problem.

Each broken copy is refused the same way by every entry point: ``caption()``,
``Captioner.load_adapter``, the caption CLI, ``evaluate``, ``merge`` and the demo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from multimodal_lora.core.errors import AdapterError
from multimodal_lora.inference.captioner import Captioner

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"
Q0 = "base_model.model.language_model.model.decoder.layers.0.self_attn.q_proj"


def _nan(tensors, config):
    tensors[f"{Q0}.lora_B.weight"][3, 1] = float("nan")


def _inf(tensors, config):
    tensors[f"{Q0}.lora_A.weight"][0, 0] = float("inf")


def _shape(tensors, config):
    tensors[f"{Q0}.lora_A.weight"] = torch.zeros(4, 64)


def _rank(tensors, config):
    config["r"] = 8  # the tensors are rank 4


def _vision(tensors, config):
    tensors["base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight"] = torch.zeros(4, 64)


def _no_target(tensors, config):
    config["target_modules"] = ["c_attn"]  # a GPT-2 name: nothing in BLIP-2-OPT


def _renamed(tensors, config):
    # Keys of an adapter for a bare OPT: no tensor lands on this base.
    for key in list(tensors):
        tensors[key.replace("language_model.model.", "model.")] = tensors.pop(key)


def _missing(tensors, config):
    for key in [k for k in tensors if ".q_proj." in k]:
        del tensors[key]


CASES = {
    "nan": (_nan, r"tensor .*q_proj\.lora_B\.weight has 1 non-finite values \(NaN or inf\)"),
    "inf": (_inf, r"tensor .*q_proj\.lora_A\.weight has 1 non-finite values"),
    "shape": (_shape, r"tensor .*q_proj\.lora_A\.weight has shape \[4, 64\], but .* needs \[4, 128\]"),
    "rank": (_rank, r"_proj\.lora_A\.weight has shape \[4, 128\], but .* with r=8 needs \[8, 128\]"),
    "vision": (_vision, r"tensor .*vision_model.*fc1\.lora_A\.weight adapts .* not an attention projection of the .*language model"),
    "no-target": (_no_target, r"adapter_config\.json: its target_modules .*c_attn.* match none of the base's modules"),
    "renamed": (_renamed, r"tensor base_model\.model\.model\.decoder.* not an attention projection of the .*language model"),
    "missing": (_missing, r"has no weights for 2 of the 8 modules its target_modules select .*q_proj"),
}


def make_broken(source: Path, root: Path, case: str) -> Path:
    target = root / case / "adapter"
    shutil.copytree(source, target)
    tensors = load_file(str(target / WEIGHTS))
    config = json.loads((target / "adapter_config.json").read_text())
    CASES[case][0](tensors, config)
    save_file(tensors, str(target / WEIGHTS))
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def broken(quick_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken runs")
    return {case: make_broken(quick_adapter, root, case) for case in CASES}


@pytest.fixture(scope="module")
def image(shapes_dir):
    return str(sorted((shapes_dir / "validation").glob("*.png"))[0])


@pytest.mark.parametrize("case", list(CASES))
def test_captioner_refuses_and_stays_usable(case, broken, quick_adapter, image):
    captioner = Captioner("tiny", device="cpu")
    bare = captioner.caption(image)
    with pytest.raises(AdapterError, match=CASES[case][1]) as err:
        captioner.load_adapter(broken[case])
    assert str(broken[case]) in str(err.value)
    # Refused before PEFT touched the model: the base is as it was, and a good adapter still loads.
    assert captioner.adapter_names == [] and captioner.caption(image) == bare
    captioner.load_adapter(quick_adapter, name="good")
    assert captioner.caption(image, adapter="good") != bare


@pytest.mark.parametrize("case", ["nan", "shape", "vision", "no-target"])
def test_caption_function_refuses(case, broken, image):
    from multimodal_lora import caption

    with pytest.raises(AdapterError, match=CASES[case][1]):
        caption(image, adapter=broken[case])


def test_caption_cli_refuses_in_one_line(broken, image):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for case in ("nan", "shape"):
        proc = subprocess.run(
            [sys.executable, "-m", "multimodal_lora.caption", image, "--adapter", str(broken[case])],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert str(broken[case] / WEIGHTS) in lines[0]
        assert proc.stdout == ""  # no empty caption printed


@pytest.mark.parametrize("case", ["nan", "rank", "missing"])
def test_merge_refuses_and_writes_nothing(case, broken, tmp_path):
    from multimodal_lora.merge import merge_adapter

    with pytest.raises(AdapterError, match=CASES[case][1]):
        merge_adapter(broken[case], tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_and_writes_no_report(broken, small_shapes_dir):
    from multimodal_lora.config import load_recipe
    from multimodal_lora.evaluate.run import evaluate

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"data.path={small_shapes_dir}"])
    with pytest.raises(AdapterError, match=CASES["vision"][1]):
        evaluate(recipe, broken["vision"], max_images=2, meteor=False)
    assert not (broken["vision"].parent / "eval").exists()


def test_demo_lists_broken_adapters_as_unusable_and_serves_the_rest(broken, quick_adapter, tmp_path):
    from multimodal_lora import demo
    from multimodal_lora.adapter import find_adapters

    runs = tmp_path / "runs"
    shutil.copytree(broken["nan"].parent, runs / "diverged")
    shutil.copytree(broken["shape"].parent, runs / "other-model")
    shutil.copytree(broken["vision"].parent, runs / "stray")
    shutil.copytree(quick_adapter, runs / "good" / "adapter")
    found = find_adapters(runs)
    captioner = Captioner.for_adapters(found, None, device="cpu", dtype="fp32", quantization="none")
    assert list(found.adapters) == ["good"] and captioner.adapter_names == ["good"]
    problems = "\n".join(found.problems)
    assert len(found.problems) == 3
    assert "diverged" in problems and "non-finite" in problems
    assert "other-model" in problems and "has shape [4, 64]" in problems
    assert "stray" in problems and "not an attention projection" in problems
    text = demo.status_text(found, runs, "tiny")
    assert "diverged" in text and "unusable" in text
