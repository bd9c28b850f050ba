"""The demo's parts in-process: version floors, finding adapters, the app with no adapter trained yet."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from multimodal_lora import demo
from multimodal_lora.adapter import find_adapters

REPO = Path(__file__).resolve().parents[1]


def test_gradio_and_torch_floors():
    import gradio
    import torch
    from packaging.version import Version

    # Gradio 6.16 carries the published path-traversal and SSRF fixes; torch 2.6 makes torch.load safe.
    assert Version(gradio.__version__) >= Version("6.16")
    assert Version(torch.__version__.split("+")[0]) >= Version("2.6")
    assert (demo.MIN_GRADIO, demo.MIN_TORCH) == ("6.16", "2.6")
    demo.check_versions()
    if sys.version_info >= (3, 11):
        from importlib.metadata import version

        import tomllib
        from packaging.requirements import Requirement

        deps = {r.name: r for r in map(Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])}
        # The floors the code checks are the ones pyproject asks for, and what is installed fits every bound.
        assert ">=6.16" in str(deps["gradio"].specifier) and ">=2.6" in str(deps["torch"].specifier)
        for name, requirement in deps.items():
            assert requirement.specifier.contains(version(name).split("+")[0], prereleases=True), (name, version(name))


def test_find_adapters_names_runs_and_skips_broken_ones(tiny_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run.adapter_dir, runs / "football" / "adapter")
    shutil.copytree(tiny_run.adapter_dir, runs / "sweeps" / "r8" / "adapter")
    shutil.copytree(tiny_run.adapter_dir, runs / "broken" / "adapter")
    weights = runs / "broken" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    (runs / "notes").mkdir()
    # Checkpoints and temporaries hold adapters too, but are not what to offer.
    shutil.copytree(tiny_run.adapter_dir, runs / "football" / "checkpoints" / "checkpoint-00000010" / "adapter")
    shutil.copytree(tiny_run.adapter_dir, runs / "football" / ".tmp-adapter" / "adapter")

    found = find_adapters(runs)
    assert list(found.adapters) == ["football", "sweeps/r8"]
    assert found.tasks == {"football": "caption", "sweeps/r8": "caption"}
    assert found.base == "tiny"
    assert len(found.problems) == 1
    assert "broken" in found.problems[0] and "truncated or corrupt" in found.problems[0]


def test_missing_adapters_dir_is_a_message_not_an_error(tmp_path):
    found = find_adapters(tmp_path / "runs")
    assert found.adapters == {}
    assert found.problems == [f"{tmp_path / 'runs'} does not exist or is not a directory"]
    text = demo.status_text(found, tmp_path / "runs", "tiny")
    assert "No adapter found under" in text and "python -m multimodal_lora.train recipes/tiny.yaml" in text


def test_demo_with_no_adapter_trained_yet_captions_with_the_base(tmp_path, shapes_dir, monkeypatch):
    import socket

    from gradio_client import Client

    from multimodal_lora import Captioner
    from multimodal_lora.evaluate.report import legible

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "unused"))  # serve() sets its own; restore it after
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = demo.serve(tmp_path / "runs", device="cpu", port=port, block=False)
    try:
        image = str(sorted((shapes_dir / "validation").glob("*.png"))[0])
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        from gradio_client import handle_file

        _, text, _ = client.predict(handle_file(image), "(base)", False, "", 30, 1, False, 1.0, 1.0, api_name="/caption")
        # The bare base's output, made legible (its random weights emit bytes that are not UTF-8 text).
        assert text == legible(Captioner("tiny", device="cpu").caption(image))
        assert "\ufffd" not in text
        config = json.loads(json.dumps(app.config))
        markdown = " ".join(str(c["props"].get("value")) for c in config["components"] if c.get("type") == "markdown")
        assert "No adapter found under" in markdown
        dropdowns = [c["props"] for c in config["components"] if c.get("type") == "dropdown"]
        assert all([choice[1] for choice in d["choices"]] == ["(base)"] for d in dropdowns)
    finally:
        app.close()
