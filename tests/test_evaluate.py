"""Captioning metrics, and the base-vs-adapter evaluation report."""

from __future__ import annotations

from pathlib import Path

import pytest

from multimodal_lora.commands.evaluate import main
from multimodal_lora.core.metrics import METRICS, caption_metrics, meteor_available, normalize
from multimodal_lora.data.sources import Example
from multimodal_lora.evaluate.run import group_references

REPO = Path(__file__).resolve().parents[1]


def test_metrics_use_every_reference():
    # BLEU-4 needs 4-grams: captions of four words or more.
    refs = [["a red circle on white", "a small red circle here"], ["a blue square on grey"]]
    perfect = caption_metrics(["A red circle, on white.", "a blue square on grey"], refs, meteor=False)
    assert perfect["exact_match"] == 1.0
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["meteor"] is None
    # Matching the second reference still counts as a match.
    second = caption_metrics(["a small red circle here", "a blue square on grey"], refs, meteor=False)
    assert second["exact_match"] == 1.0
    wrong = caption_metrics(["a green star on black", "a yellow cross at the top"], refs, meteor=False)
    assert wrong["exact_match"] == 0.0
    for key in ("bleu4", "cider_d", "rouge_l"):
        assert wrong[key] < perfect[key], key
    empty = caption_metrics(["", ""], refs, meteor=False)
    assert empty["exact_match"] == 0.0 and empty["bleu4"] < 1e-6
    assert normalize("  A Red,  circle! ") == "a red circle"


def test_validation_rows_are_grouped_by_image():
    rows = [Example("a.png", "a red circle", "a", "r1"), Example("b.png", "a blue star", "b", "r2"), Example("a.png", "red circle", "a", "r3")]
    groups = group_references(rows)
    assert [(g.image_id, g.references) for g in groups] == [("a", ["a red circle", "red circle"]), ("b", ["a blue star"])]


@pytest.mark.slow
def test_evaluate_shows_the_adapter_beating_the_base(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main([str(REPO / "recipes" / "tiny.yaml"), "--adapter", str(tiny_run.adapter_dir), "--out", str(out), "--max-images", "40", "--samples", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.split() and line.split()[0] in ("val_loss", *METRICS)}
    base_loss, adapter_loss = map(float, rows["val_loss"])
    assert adapter_loss < base_loss
    for key in METRICS:
        if key == "meteor" and not meteor_available():
            assert rows[key] == ["n/a", "n/a"]
            continue
        base, adapter = map(float, rows[key])
        assert adapter > base, f"{key}: adapter {adapter} vs base {base}"
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "| BLEU-4 |" in md and "<th>adapter</th>" in page
    images = sorted((out / "thumbnails").glob("*.png"))
    assert len(images) == 4
    headings = [line for line in md.splitlines() if line.startswith("### ")]
    for name in ["00000.png", "00001.png", "00002.png", "00003.png"]:
        # Images are named by their id: the file's path for an imagefolder.
        assert any(h.endswith(f"/validation/{name}") for h in headings), headings
        assert f"/validation/{name}" in page
    assert md.count("- adapter: ") == 4 and md.count("- references: ") == 4
