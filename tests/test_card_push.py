"""Model cards written with every adapter, and `multimodal_lora.push` up to the network call."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def short_run(small_shapes_dir, tmp_path_factory):
    """recipes/tiny.yaml on 24 images for 2 epochs (12 steps, two evaluations): seconds, not minutes."""
    from multimodal_lora.config import load_recipe
    from multimodal_lora.training import train

    out = tmp_path_factory.mktemp("card-run")
    overrides = [f"output_dir={out}", f"data.path={small_shapes_dir}", "train.batch_size=4", "train.epochs=2"]
    overrides += ["train.eval_max_new_tokens=4", "model.device=cpu"]
    return train(load_recipe(REPO / "recipes" / "tiny.yaml", overrides))


def _lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def test_tiny_run_adapter_has_a_card_hub_tools_parse(short_run):
    from huggingface_hub import ModelCard

    from multimodal_lora.core.metrics import SCALES

    adapter = short_run.adapter_dir
    card = ModelCard.load(adapter / "README.md")
    base = json.loads((adapter / "multimodal_lora.json").read_text())["base"]
    assert card.data.base_model == base["name_or_path"]  # tiny is local: its path, with a note
    assert card.data.library_name == "peft"
    assert card.data.pipeline_tag == "image-to-text"
    assert {"lora", "peft", "image-captioning"} <= set(card.data.tags)
    assert card.data.datasets is None  # the bundled data did not come from the hub
    assert "It is not on the hub" in card.text

    # The metrics of the run's last evaluation, each with its scale.
    run_dir = adapter.parent
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in last if r["split"] == "validation"][-1]
    assert f"step {last['step']}" in card.text
    for key in ("val_loss", "bleu4", "cider_d", "rouge_l", "exact_match"):
        rows = [line for line in _lines_with(card.text, SCALES[key]) if f"| {last[key]:.4f} |" in line]
        assert len(rows) == 1, (key, last[key])
    assert short_run.metrics["val_loss"] == pytest.approx(last["val_loss"])

    # The trainable-parameter table and the recipe as run.
    lora_params = sum(
        p.numel()
        for p in __import__("safetensors.torch").torch.load_file(adapter / "adapter_model.safetensors").values()
    )
    assert _lines_with(card.text, f"| total | {lora_params:,} |")
    recipe_block = card.text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block) == yaml.safe_load((run_dir / "recipe.yaml").read_text())
    # Usage snippets: ours and plain PEFT.
    assert f'adapter = "{adapter}"' in card.text and "PeftModel.from_pretrained" in card.text

    # Every checkpoint's adapter has its own card, describing its own step.
    from multimodal_lora.training.checkpoint import find_checkpoints

    for checkpoint in find_checkpoints(run_dir):
        assert ModelCard.load(checkpoint / "adapter" / "README.md").data.library_name == "peft"


def test_card_names_a_hub_base_and_hub_data(tmp_path):
    from huggingface_hub import ModelCard

    from multimodal_lora.adapter import AdapterMeta
    from multimodal_lora.adapter.card import CardFacts, render_card
    from multimodal_lora.model.base import BaseInfo

    meta = AdapterMeta(base=BaseInfo("Salesforce/blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", None, "abc"), task="vqa")
    facts = CardFacts(
        metrics={"val_loss": 1.25, "exact_match": 0.5, "meteor": None},
        metrics_step=7,
        parameters={"language model": (10, 1000), "total": (10, 5000)},
        datasets=("ybelkada/football-dataset",),
    )
    path = tmp_path / "README.md"
    path.write_text(str(render_card(meta, facts)))
    card = ModelCard.load(path)
    assert card.data.base_model == "Salesforce/blip2-opt-2.7b"
    assert card.data.datasets == ["ybelkada/football-dataset"]
    assert "visual-question-answering" in card.data.tags
    assert "Base model:" not in card.text  # a hub id needs no note
    assert "| exact match | 0.5000 |" in card.text and "METEOR" not in card.text  # not computed: not shown
    assert "| language model | 10 | 1,000 | 1.000% |" in card.text
    assert "ask(" in card.text and "'Question: What colour is the shape? Answer:'" in card.text
    assert "recipe was not recorded" in card.text


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _push(adapter: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    base_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    base_env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf-home"), **env)
    command = [
        sys.executable,
        "-m",
        "multimodal_lora.push",
        "--adapter",
        str(adapter),
        "--repo-id",
        "someone/tiny-shapes",
    ]
    command += ["--base-model", "Salesforce/blip2-opt-2.7b", "--private", "--revision", "try"]
    return subprocess.run(command, capture_output=True, text=True, env=base_env, timeout=120)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "error: offline: HF_HUB_OFFLINE is set"),
        ({"HF_HUB_OFFLINE": "0"}, "error: no Hugging Face token"),
        # A real request with a token, to a port where nothing listens: the client's own error, caught.
        (
            {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_real_token", "HF_ENDPOINT": "http://127.0.0.1:9"},
            "error: cannot reach the hub",
        ),
    ],
    ids=["offline", "no-token", "unreachable"],
)
def test_push_that_cannot_happen_says_why_in_one_line(short_run, tmp_path, env, message):
    before = _digest(short_run.adapter_dir)
    proc = _push(short_run.adapter_dir, tmp_path, **env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line
    assert proc.stderr.startswith(message), proc.stderr
    assert "nothing was pushed" in proc.stderr or "token" in proc.stderr
    assert _digest(short_run.adapter_dir) == before  # nothing lost, nothing changed


def test_prepare_upload_checks_everything_before_the_network(short_run, tmp_path):
    from huggingface_hub import ModelCard

    from multimodal_lora.push import PushError, prepare_upload

    with pytest.raises(PushError, match="base_model is .* not a hub id.*--base-model"):
        prepare_upload(short_run.adapter_dir)
    upload = prepare_upload(short_run.adapter_dir, base_model="Salesforce/blip2-opt-2.7b")
    assert sorted(upload.files) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "multimodal_lora.json",
    ]
    (tmp_path / "README.md").write_bytes(upload.files["README.md"])
    assert ModelCard.load(tmp_path / "README.md").data.base_model == "Salesforce/blip2-opt-2.7b"
    # The directory's own card is untouched (the rewritten card is uploaded from memory).
    assert ModelCard.load(short_run.adapter_dir / "README.md").data.base_model != "Salesforce/blip2-opt-2.7b"

    # A broken card is named, not pushed.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(short_run.adapter_dir, broken)
    (broken / "README.md").write_text("---\nbase_model: [unclosed\n---\n")
    with pytest.raises(PushError, match="not a readable model card"):
        prepare_upload(broken, base_model="Salesforce/blip2-opt-2.7b")


def test_the_cards_plain_peft_snippet_captions_like_caption(short_run, small_shapes_dir, capsys):
    from huggingface_hub import ModelCard

    from multimodal_lora import caption

    card = ModelCard.load(short_run.adapter_dir / "README.md")
    snippet = card.text.split("With plain transformers + PEFT:")[1].split("```python\n", 1)[1].split("```", 1)[0]
    image = str(small_shapes_dir / "validation" / "00000.png")
    capsys.readouterr()
    exec(snippet.replace('"photo.jpg"', repr(image)), {})  # noqa: S102 - the card's own text, as a user would paste it
    assert capsys.readouterr().out.strip() == caption(image, adapter=short_run.adapter_dir)
