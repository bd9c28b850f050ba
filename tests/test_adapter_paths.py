"""Adapters at ordinary paths: dots, spaces, non-ASCII letters and symlinks, through every entry point.

PEFT keeps adapters as module attributes, so its adapter names cannot contain ".";
ours are whatever the user's path is. Every way in must work at such paths.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from multimodal_lora.inference.captioner import Captioner, peft_adapter_name

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# A home directory with a dot, a project with a dot and a space, non-ASCII letters.
HOSTILE = ("home", "j.doe", ".cache", "my project.v2", "ñandú 写真 Ωmega")


@pytest.fixture(scope="module")
def images(shapes_dir):
    return [str(p) for p in sorted((shapes_dir / "validation").glob("*.png"))[:3]]


@pytest.fixture(scope="module")
def places(quick_adapter, tmp_path_factory):
    """The same adapter at a hostile path (as a run directory holding adapter/) and behind a dotted symlink."""
    root = tmp_path_factory.mktemp("paths")
    run = root.joinpath(*HOSTILE)
    shutil.copytree(quick_adapter, run / "adapter")
    shutil.copyfile(quick_adapter.parent / "adapter" / "adapter_config.json", run / "adapter" / "adapter_config.json")
    link = root / "link.to.run"
    link.symlink_to(run, target_is_directory=True)
    return {"run": run, "adapter": run / "adapter", "link": link / "adapter"}


@pytest.fixture(scope="module")
def expected(quick_adapter, images):
    """Captions of the adapter loaded from its plain path under a plain name."""
    captioner = Captioner("tiny", device="cpu")
    captioner.load_adapter(quick_adapter, name="plain")
    captions = captioner.caption(images, adapter="plain")
    assert captions != captioner.caption(images), "the test adapter must change the captions"
    return {"captions": captions, "answers": captioner.ask(images, "What colour is the shape?", adapter="plain")}


def test_peft_names_are_valid_module_names_and_distinct():
    names = ["/home/j.doe/runs/tiny/adapter", "/home/j_doe/runs/tiny/adapter", "a b", "写真", "", ".", "default"]
    derived = [peft_adapter_name(n) for n in names]
    assert len(set(derived)) == len(names)
    for d in derived:
        assert d.isidentifier() and "." not in d and d.isascii(), d
    assert peft_adapter_name(names[0]) == derived[0]  # stable: the same name finds the same adapter


def test_caption_and_ask_at_hostile_paths(places, expected, images):
    from multimodal_lora import ask, caption, clear_cache

    clear_cache()
    for where in (places["adapter"], places["run"], places["link"], str(places["adapter"])):
        assert caption(images, adapter=where) == expected["captions"], where
        assert ask(images, "What colour is the shape?", adapter=where) == expected["answers"], where


def test_captioner_load_adapter_names_and_lookup(places, expected, images):
    captioner = Captioner("tiny", device="cpu")
    # The default name is the run's name, dots and all; an explicit one may be any string.
    default = captioner.load_adapter(places["adapter"])
    assert default == HOSTILE[-1]
    named = captioner.load_adapter(places["link"], name="shapes v1.2 (ü)")
    assert captioner.adapter_names == [HOSTILE[-1], "shapes v1.2 (ü)"]
    assert captioner.caption(images, adapter=default) == expected["captions"]
    assert captioner.caption(images, adapter=named) == expected["captions"]
    # The symlink resolves to the same directory: loading it again under that name is a no-op.
    assert captioner.load_adapter(places["adapter"], name="shapes v1.2 (ü)") == named
    assert captioner.adapter_names == [HOSTILE[-1], "shapes v1.2 (ü)"]


def test_caption_cli_at_hostile_paths(places, expected, images, tmp_path, capsys):
    from multimodal_lora.commands.caption import main

    out = tmp_path / "out.v1 ü" / "captions.jsonl"
    assert main([*images, "--adapter", str(places["link"]), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in rows] == expected["captions"]
    assert main([images[0], "--adapter", str(places["run"])]) == 0
    assert capsys.readouterr().out.strip().endswith("\t" + expected["captions"][0])


def test_evaluate_at_hostile_paths(places, small_shapes_dir, tmp_path):
    from multimodal_lora.config import load_recipe
    from multimodal_lora.evaluate.run import evaluate

    recipe = load_recipe(RECIPES / "tiny.yaml", [f"data.path={small_shapes_dir}"])
    out, table = evaluate(recipe, places["link"], tmp_path / "eval.d ü", max_images=4, samples=2, meteor=False)
    assert (out / "report.md").is_file()
    # The adapter (random B matrices) is not the base: the two columns differ.
    assert table["adapter"]["val_loss"] != table["base"]["val_loss"]


def test_merge_at_hostile_paths(places, expected, images, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    from multimodal_lora.merge import merge_adapter

    out = merge_adapter(places["link"], tmp_path / "merged.v1 ñ" / "model")
    merged = Blip2ForConditionalGeneration.from_pretrained(out)
    captioner = Captioner.from_model(merged, Captioner("tiny", device="cpu").processor, None)
    assert captioner.caption(images) == expected["captions"]


def test_demo_discovery_at_hostile_paths(places, quick_adapter, tmp_path):
    from multimodal_lora.adapter import find_adapters

    runs = tmp_path / "runs.d"
    shutil.copytree(places["run"], runs / "j.doe" / "tiny.v2")
    shutil.copytree(quick_adapter, runs / "ñandú 写真" / "adapter")
    os.symlink(places["run"], runs / "linked.run")
    found = find_adapters(runs)
    assert sorted(found.adapters) == ["j.doe/tiny.v2", "linked.run", "ñandú 写真"]
    assert found.problems == []
    captioner = Captioner.for_adapters(found, None, device="cpu", dtype="fp32", quantization="none")
    assert found.problems == [] and sorted(captioner.adapter_names) == sorted(found.adapters)


def test_peft_round_trip_at_hostile_paths(places, expected, images):
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    from multimodal_lora.adapter import read_adapter

    directory, meta = read_adapter(places["link"])
    base = Blip2ForConditionalGeneration.from_pretrained(meta.base.name_or_path)
    model = PeftModel.from_pretrained(base, str(directory)).eval()
    captioner = Captioner.from_model(model, Captioner("tiny", device="cpu").processor, meta.base, {"default": meta})
    assert captioner.caption(images, adapter="default") == expected["captions"]
    with torch.no_grad():
        assert all(torch.isfinite(p).all() for p in model.parameters())


PUBLIC_FUNCTIONS_CHECK = """
import multimodal_lora.inference.captioner, multimodal_lora.training
from multimodal_lora import caption, train
assert caption is multimodal_lora.inference.captioner.caption, caption
assert train is multimodal_lora.training.train, train
import multimodal_lora
assert multimodal_lora.caption is caption and multimodal_lora.train is train
print("functions")
"""

# What may run before `from multimodal_lora import caption, train`: the commands imported, or run
# in-process the way `python -m` runs them (runpy), each in a fresh interpreter.
BEFORE = {
    "nothing": "",
    "the functions first": "from multimodal_lora import train, caption",
    "the commands imported": "import multimodal_lora.commands.caption, multimodal_lora.commands.train",
    "the commands run": (
        "from multimodal_lora.commands import caption as c, train as t\n"
        "t.main([{football!r}, '--plan'])\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass"
    ),
    "python -m run in-process": (
        "import runpy, sys\n"
        "for module, argv in (('multimodal_lora.train', [{football!r}, '--plan']), ('multimodal_lora.caption', ['--help'])):\n"
        "    sys.argv = [module, *argv]\n"
        "    try:\n        runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as stop:\n        assert not stop.code, stop.code"
    ),
}


@pytest.mark.parametrize("before", list(BEFORE))
def test_train_and_caption_are_the_public_functions_in_any_import_order(before):
    """The package's `train`/`caption` are the functions, whatever ran first: the commands live in
    multimodal_lora.commands, and `python -m multimodal_lora.train`/`.caption` never import those modules."""
    import subprocess
    import sys

    football = str(Path(__file__).resolve().parents[1] / "recipes" / "football.yaml")
    code = BEFORE[before].format(football=football) + "\n" + PUBLIC_FUNCTIONS_CHECK
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "functions"
