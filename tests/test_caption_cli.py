"""The batch captioning command: directories and globs in, JSONL or CSV out, past bad images."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photo_dir(shapes_dir, tmp_path_factory):
    """Five good images, a zero-byte one, a text file called .jpg, and a non-image file that is skipped."""
    root = tmp_path_factory.mktemp("photos")
    for path in sorted((shapes_dir / "validation").glob("*.png"))[:5]:
        shutil.copyfile(path, root / path.name)
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image at all\n")
    (root / "README.txt").write_text("ignored: not an image suffix\n")
    return root


@pytest.fixture(scope="module")
def expected(tiny_run, photo_dir):
    from multimodal_lora import Captioner

    captioner = Captioner("tiny", device="cpu")
    captioner.load_adapter(tiny_run.adapter_dir, name="shapes")
    return {p.name: captioner.caption(str(p), adapter="shapes") for p in sorted(photo_dir.glob("0*.png"))}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "multimodal_lora.caption", *args], capture_output=True, text=True, env=env, timeout=600)


def test_directory_to_jsonl_keeps_going_past_bad_images(tiny_run, photo_dir, expected, tmp_path):
    out = tmp_path / "captions.jsonl"
    proc = run_cli(str(photo_dir), "--adapter", str(tiny_run.adapter_dir), "--out", str(out), "--batch-size", "3")
    assert proc.returncode == 1, proc.stderr  # some images failed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == sorted(p.name for p in photo_dir.iterdir() if p.suffix != ".txt")
    good = {Path(r["image"]).name: r["caption"] for r in rows if "error" not in r}
    assert good == expected  # batched through the CLI == one by one in Python
    bad = {Path(r["image"]).name: r["error"] for r in rows if "error" in r}
    assert set(bad) == {"empty.png", "notes.jpg"}
    assert "empty file" in bad["empty.png"] and "not an image" in bad["notes.jpg"]
    # The summary names them; the progress bar ran; no traceback.
    assert "2 of 7 images could not be captioned" in proc.stderr
    assert "empty.png" in proc.stderr and "notes.jpg" in proc.stderr
    assert "captioning" in proc.stderr and "7/7" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_glob_to_csv_and_stdout(tiny_run, photo_dir, expected, tmp_path):
    from multimodal_lora.commands.caption import main

    out = tmp_path / "captions.csv"
    assert main([str(photo_dir / "0*.png"), "--adapter", str(tiny_run.adapter_dir), "--out", str(out)]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {Path(r["image"]).name: r["caption"] for r in rows} == expected
    assert all(r["error"] == "" for r in rows)


def test_stdout_lines_and_bad_arguments(tiny_run, photo_dir, expected, capsys):
    from multimodal_lora.commands.caption import main
    from multimodal_lora.core.errors import UserError

    first = sorted(photo_dir.glob("0*.png"))[0]
    assert main([str(first), "--adapter", str(tiny_run.adapter_dir)]) == 0
    assert capsys.readouterr().out == f"{first}\t{expected[first.name]}\n"
    with pytest.raises(UserError, match=r"\.jsonl or \.csv"):
        main([str(first), "--out", "captions.txt"])
    with pytest.raises(UserError, match="no files match"):
        main([str(photo_dir / "*.webp")])
