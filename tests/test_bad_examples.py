"""Bad files are found before training: ``error`` stops naming the first, ``skip`` trains without them."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from multimodal_lora.commands import run_cli
from multimodal_lora.config import load_recipe
from multimodal_lora.data.screen import BadExampleError, screen_examples
from multimodal_lora.data.sources import load_splits

from . import imagefiles

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")

# One image of each awkward mode (all usable), and the four kinds of bad file, interleaved.
ROWS = [
    ("cmyk.jpg", imagefiles.cmyk_jpeg, "a cyan square"),
    ("truncated.jpg", imagefiles.truncated_jpeg, "a noisy square"),
    ("palette.png", imagefiles.palette_png_with_transparency, "a blue square"),
    ("empty.jpg", imagefiles.zero_byte, "nothing"),
    ("grey16.png", imagefiles.grey16_png, "a grey square"),
    ("text.jpg", imagefiles.text_as_jpeg, "some words"),
    ("rotated.jpg", imagefiles.exif_rotated_jpeg, "a red and blue square"),
    ("missing.png", None, "a square that is not there"),
]
EXPECTED_BAD = {
    "truncated.jpg": "corrupt or truncated image",
    "empty.jpg": "empty file (0 bytes)",
    "text.jpg": "not an image Pillow can read",
    "missing.png": "file not found",
}


@pytest.fixture
def awkward(tmp_path) -> Path:
    """An imagefolder with the eight rows above; 4 usable images, 4 bad ones."""
    root = tmp_path / "awkward"
    root.mkdir()
    for name, writer, _ in ROWS:
        if writer is not None:
            writer(root / name)
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for name, _, text in ROWS:
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return root


def cli(main, argv, capsys) -> tuple[int, str, str]:
    """Run a command-line entry point the way the console script does; return (status, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_error_policy_refuses_to_train_and_names_the_first_bad_file(awkward, tmp_path, capsys, tiny_base):
    from multimodal_lora.commands.train import main

    out = tmp_path / "run"
    code, _, err = cli(main, [TINY, f"data.path={awkward}", f"output_dir={out}", "train.max_steps=1"], capsys)
    assert code == 2
    assert "Traceback" not in err
    first = err.strip().splitlines()[0]
    assert f"{awkward / 'metadata.jsonl'} row 2: {awkward / 'truncated.jpg'}: corrupt or truncated image" in first
    assert "(and 3 more bad examples)" in first
    assert "data.on_bad_example=skip" in first
    assert not (out / "adapter").exists()


def test_error_policy_carries_every_bad_example(awkward):
    cfg = load_recipe(TINY, [f"data.path={awkward}"]).data
    with pytest.raises(BadExampleError) as info:
        screen_examples(load_splits(cfg), cfg, progress=False)
    assert {Path(b.image).name: b.reason.split(" (")[0] for b in info.value.bad} == {
        name: reason.split(" (")[0] for name, reason in EXPECTED_BAD.items()
    }


def test_skip_policy_trains_on_the_good_ones_and_reports_four(awkward, tmp_path, caplog, tiny_base):
    from multimodal_lora.commands.train import main

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="multimodal_lora"):
        code = main([TINY, f"data.path={awkward}", "data.on_bad_example=skip", f"output_dir={out}", "train.max_steps=2", "train.batch_size=2"])
    assert code == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    reports = [r.getMessage() for r in caplog.records if "bad examples skipped" in r.getMessage()]
    assert len(reports) == 2  # at the start, and again in the summary at the end
    for report in reports:
        assert report.startswith("4 bad examples skipped")
        for name, reason in EXPECTED_BAD.items():
            assert f"{name}: {reason}" in report
    # The data line counts only the four good images.
    data_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data: "))
    train_pairs, val_pairs = (int(w) for w in data_line.split("— ")[1].replace("/", "").split() if w.isdigit())
    assert train_pairs + val_pairs == 4


def test_skip_keeps_exactly_the_good_examples(awkward):
    cfg = load_recipe(TINY, [f"data.path={awkward}", "data.on_bad_example=skip", "data.val_fraction=0"]).data
    splits = screen_examples(load_splits(cfg), cfg, progress=False)
    assert sorted(Path(e.image).name for e in splits.train) == ["cmyk.jpg", "grey16.png", "palette.png", "rotated.jpg"]
    assert len(splits.bad) == 4


def test_data_check_lists_all_four_and_fails_under_error(awkward, capsys, tiny_base):
    from multimodal_lora.commands.data import main

    code, out, _ = cli(main, ["check", TINY, f"data.path={awkward}"], capsys)
    assert code == 1
    assert "bad examples: 4 (data.on_bad_example=error" in out
    for name, reason in EXPECTED_BAD.items():
        assert f"{awkward / name}: {reason}" in out
    assert "FAIL: 4 bad examples" in out
    # Images and pairs per split, token lengths of the usable four, a suggested max_length.
    assert "caption tokens:" in out and "suggested max_length:" in out


def test_data_check_passes_under_skip(awkward, capsys, tiny_base):
    from multimodal_lora.commands.data import main

    code, out, _ = cli(main, ["check", TINY, f"data.path={awkward}", "data.on_bad_example=skip", "data.val_fraction=0"], capsys)
    assert code == 0
    assert "train" in out and " 8 " in out.split("train", 1)[1].splitlines()[0]  # 8 images read
    assert "OK: training would start" in out


def test_data_check_of_the_bundled_data_passes(capsys, tiny_base):
    from multimodal_lora.commands.data import main

    code, out, _ = cli(main, ["check", TINY], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("train ", "validation "))}
    assert rows == {"train": ["2000", "2000", "0"], "validation": ["200", "200", "0"]}
    # "an orange triangle" is 3 tokens of the tiny tokenizer: start + 3 + stop = 5 per example.
    assert "tokens per example:        min 5" in out
    assert "suggested max_length: 8" in out


def test_empty_and_whitespace_captions_are_bad_examples(tmp_path):
    imagefiles.rgb_png(tmp_path / "a.png")
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "a.png", "text": "   "}, {"file_name": "a.png", "text": None}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_recipe(TINY, [f"data.path={tmp_path}", "data.on_bad_example=skip"]).data
    splits = screen_examples(load_splits(cfg), cfg, progress=False)
    assert [e.target for e in splits.train] == ["a red square"]
    assert [b.origin.rsplit(" ", 1)[-1] for b in splits.bad] == ["2", "3"]
    assert all(b.reason.startswith("empty caption") for b in splits.bad)


def test_overlong_captions_are_truncated_with_one_counting_warning(tiny_base):
    from transformers import AutoTokenizer

    from multimodal_lora.data.encoding import ExampleEncoder
    from multimodal_lora.data.sources import Example
    from multimodal_lora.families.layouts import DecoderOnlyLayout

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    layout = DecoderOnlyLayout(image_token_id=9, num_query_tokens=2, bos_token_id=2, pad_token_id=1, stop_token_id=7, target_prefix=" ")
    encoder = ExampleEncoder(tokenizer, layout, task="caption", prompt=None, prompt_template="", max_length=6)
    long = "a red circle and a blue square and a green cross"
    examples = [Example("x.png", t, "x", "row") for t in (long, "an orange triangle", long)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = encoder.encode_all(examples)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith("2 of 3 targets were longer than data.max_length=6")
    for item in encoded:
        input_ids, labels = item["input_ids"], item["labels"]
        assert len(input_ids) - layout.num_query_tokens <= 6
        assert labels[-1] == layout.stop_token_id  # truncated, yet still taught to stop


@pytest.mark.parametrize("threads_from", [0.0, float("inf")], ids=["thread-pool", "one-thread"])
def test_screening_on_threads_or_in_one_finds_the_same_in_the_same_order(awkward, monkeypatch, threads_from):
    """The screen decodes small images in one thread and large ones on a pool; either way every
    example gets its own verdict, in order, across many chunks."""
    from multimodal_lora.data import screen
    from multimodal_lora.data.sources import Example

    rows = [(awkward / name, text) for name, _, text in ROWS] * 13  # 104 rows, 8 distinct images: many chunks
    examples = [Example(str(path), text, f"{path.name}#{i}", f"row {i}") for i, (path, text) in enumerate(rows)]
    monkeypatch.setattr(screen, "THREADS_FROM_SECONDS", threads_from)
    found = screen.scan(examples, "train", workers=2, progress=True)
    assert len(found) == len(examples)
    for example, bad in zip(examples, found):
        name = Path(example.image).name
        if name in EXPECTED_BAD:
            assert bad is not None and EXPECTED_BAD[name] in bad.reason and bad.origin == example.origin
        else:
            assert bad is None, bad
