"""Every source a captioning user has, read into the same examples, split by image, trained on."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from multimodal_lora.config import DataConfig, load_recipe
from multimodal_lora.core.errors import ConfigError, DataError
from multimodal_lora.data.images import StoredImage, load_image
from multimodal_lora.data.shapes import draw_shape
from multimodal_lora.data.sources import group_references, hold_out, load_splits

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "cross", "circle", "square"]


def draw_images(directory: Path, count: int = 6, start: int = 0) -> list[str]:
    """Images ``start`` .. ``start + count - 1`` in ``directory`` (image i shows :func:`caption` i)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(start)
    names = []
    for i in range(start, start + count):
        name = f"img{i:02d}.png"
        draw_shape(COLOURS[i % 6], SHAPES[i % 6], rng).save(directory / name)
        names.append(name)
    return names


def caption(i: int) -> str:
    return f"a {COLOURS[i % 6]} {SHAPES[i % 6]}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- one fixture per source kind; each returns (recipe overrides, expected train+validation pairs) ---


def imagefolder_flat(root: Path):
    names = draw_images(root)
    write_jsonl(root / "metadata.jsonl", [{"file_name": n, "text": caption(i)} for i, n in enumerate(names)])
    return [f"data.path={root}"], 6


def imagefolder_splits_csv(root: Path):
    train = draw_images(root / "train", 4)
    val = draw_images(root / "validation", 2, start=4)
    write_csv(root / "train" / "metadata.csv", [{"file_name": n, "text": caption(i)} for i, n in enumerate(train)])
    write_csv(root / "validation" / "metadata.csv", [{"file_name": n, "text": caption(i)} for i, n in enumerate(val, 4)])
    return [f"data.path={root}"], 6


def manifest_jsonl(root: Path):
    names = draw_images(root / "pictures")
    # The manifest lives elsewhere; image paths are relative to it.
    rows = [{"image": f"../pictures/{n}", "text": caption(i)} for i, n in enumerate(names)]
    return [f"data.path={write_jsonl(root / 'lists' / 'pairs.jsonl', rows)}"], 6


def manifest_csv_mapped_columns(root: Path):
    names = draw_images(root / "pictures")
    rows = [{"picture": f"pictures/{n}", "description": caption(i)} for i, n in enumerate(names)]
    path = write_csv(root / "pairs.csv", rows)
    return [f"data.path={path}", "data.image_column=picture", "data.text_column=description"], 6


def coco(root: Path):
    names = draw_images(root / "images")
    data = {
        "info": {"description": "test"},
        "images": [{"id": 100 + i, "file_name": n} for i, n in enumerate(names)],
        # Two captions per image: 12 pairs over 6 images.
        "annotations": [
            {"id": k, "image_id": 100 + i, "caption": text}
            for k, (i, text) in enumerate((i, t) for i in range(6) for t in (caption(i), f"the {caption(i)[2:]}"))
        ],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "captions.json").write_text(json.dumps(data))
    return [f"data.path={root / 'annotations' / 'captions.json'}", f"data.image_dir={root / 'images'}"], 12


def saved(root: Path):
    import datasets

    names = draw_images(root / "raw")
    table = {"image": [str(root / "raw" / n) for n in names], "text": [caption(i) for i in range(6)]}
    dataset = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": dataset.select(range(4)), "validation": dataset.select(range(4, 6))}).save_to_disk(
        str(root / "saved")
    )
    return [f"data.path={root / 'saved'}"], 6


SOURCES = {
    "imagefolder": imagefolder_flat,
    "imagefolder-csv-splits": imagefolder_splits_csv,
    "manifest-jsonl": manifest_jsonl,
    "manifest-csv": manifest_csv_mapped_columns,
    "coco": coco,
    "saved": saved,
}
KINDS = {
    "imagefolder": "imagefolder",
    "imagefolder-csv-splits": "imagefolder",
    "manifest-jsonl": "manifest",
    "manifest-csv": "manifest",
    "coco": "coco",
    "saved": "saved",
}


def data_config(overrides: list[str]) -> DataConfig:
    return load_recipe(REPO / "recipes" / "tiny.yaml", overrides).data


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_source_reads_its_pairs(tmp_path, name):
    from multimodal_lora.data.sources import detect_source

    overrides, pairs = SOURCES[name](tmp_path)
    cfg = data_config(overrides)
    assert detect_source(cfg) == KINDS[name]
    splits = load_splits(cfg)
    examples = splits.train + splits.validation
    assert len(examples) == pairs
    assert splits.num_images("train") + splits.num_images("validation") == 6
    assert not {e.image_id for e in splits.train} & {e.image_id for e in splits.validation}
    # Every example's image decodes to the shape whose caption it carries.
    for example in examples:
        image = load_image(example.image)
        assert image.size == (64, 64)
        colour = example.target.split()[1]
        assert colour in COLOURS
    assert {e.target for e in examples} >= {caption(i) for i in range(6)}


def test_saved_images_are_read_lazily(tmp_path):
    overrides, _ = saved(tmp_path)
    splits = load_splits(data_config(overrides))
    first = splits.train[0]
    # A reference into the memory-mapped table, not the bytes.
    assert isinstance(first.image, StoredImage)
    assert isinstance(first.image.read(), bytes)


def test_source_validation_split_is_used(tmp_path):
    overrides, _ = imagefolder_splits_csv(tmp_path)
    splits = load_splits(data_config(overrides))
    assert len(splits.train) == 4 and len(splits.validation) == 2
    assert all("/validation/" in e.image for e in splits.validation)
    assert "'validation' split" in splits.held_out


def test_coco_keeps_every_caption_and_groups_references(tmp_path):
    overrides, _ = coco(tmp_path)
    splits = load_splits(data_config([*overrides, "data.val_fraction=0.34"]))
    assert splits.num_images("validation") == 2  # round(6 × 0.34)
    assert len(splits.validation) == 4  # both captions of each held-out image
    groups = group_references(splits.validation)
    assert len(groups) == 2
    for first, references in groups:
        assert len(references) == 2
        assert references[0].split()[-1] == references[1].split()[-1]  # same shape, two phrasings
        assert first.origin.endswith("]") and "annotations[" in first.origin


def test_list_of_captions_in_one_row(tmp_path):
    names = draw_images(tmp_path, 2)
    rows = [{"file_name": n, "text": [caption(i), f"one {caption(i)[2:]}"]} for i, n in enumerate(names)]
    write_jsonl(tmp_path / "metadata.jsonl", rows)
    splits = load_splits(data_config([f"data.path={tmp_path}", "data.val_fraction=0"]))
    assert [e.target for e in splits.train] == ["a red circle", "one red circle", "a green square", "one green square"]
    assert len({e.image_id for e in splits.train}) == 2


def test_held_out_split_is_deterministic_by_image_and_independent_of_row_order(tmp_path):
    overrides, _ = coco(tmp_path)
    cfg = data_config([*overrides, "data.val_fraction=0.5"])
    first = load_splits(cfg)
    again = load_splits(cfg)
    assert first.train == again.train and first.validation == again.validation
    assert not {e.image_id for e in first.train} & {e.image_id for e in first.validation}
    # The same images are held out whatever the order of the rows.
    shuffled = list(reversed(first.train + first.validation))
    _, held = hold_out(shuffled, 0.5, cfg.split_seed)
    assert {e.image_id for e in held} == {e.image_id for e in first.validation}
    # Another seed holds out other images (for this data and these two seeds).
    other = load_splits(data_config([*overrides, "data.val_fraction=0.5", "data.split_seed=1"]))
    assert {e.image_id for e in other.validation} != {e.image_id for e in first.validation}


def test_hold_out_never_takes_every_image_and_zero_takes_none(tmp_path):
    overrides, _ = imagefolder_flat(tmp_path)
    assert load_splits(data_config([*overrides, "data.val_fraction=0"])).validation == []
    splits = load_splits(data_config([*overrides, "data.val_fraction=0.99"]))
    assert splits.num_images("train") == 1 and splits.num_images("validation") == 5


def test_image_in_both_source_splits_is_dropped_from_train(tmp_path, caplog):
    names = draw_images(tmp_path / "pictures", 3)
    rows = [{"image": f"pictures/{n}", "text": caption(i)} for i, n in enumerate(names)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[2:])
    splits = load_splits(data_config([f"data.path={train}", f"data.val_path={val}"]))
    assert [e.target for e in splits.train] == [caption(0), caption(1)]
    assert [e.target for e in splits.validation] == [caption(2)]
    assert "also in the validation split" in caplog.text


# --- errors name the file, the row and what to do ----------------------------------------------


def test_missing_column_names_file_row_and_columns(tmp_path):
    names = draw_images(tmp_path, 1)
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"image": names[0], "caption": "a red circle"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl row 1: no 'text' column \(columns: image, caption\); set data\.text_column"):
        load_splits(data_config([f"data.path={path}"]))


def test_metadata_that_is_not_utf8_names_the_file(tmp_path):
    draw_images(tmp_path, 1)
    (tmp_path / "metadata.csv").write_bytes("file_name,text\nimg00.png,un cercle rouge à gauche\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"metadata\.csv: not UTF-8 text .*save it as UTF-8"):
        load_splits(data_config([f"data.path={tmp_path}"]))


def test_csv_with_byte_order_mark_reads_its_first_column(tmp_path):
    draw_images(tmp_path, 1)
    (tmp_path / "metadata.csv").write_bytes("file_name,text\nimg00.png,a red circle\n".encode("utf-8-sig"))
    splits = load_splits(data_config([f"data.path={tmp_path}", "data.val_fraction=0"]))
    assert splits.train[0].target == "a red circle"


def test_nonexistent_path_says_what_a_path_can_be(tmp_path):
    with pytest.raises(DataError, match="does not exist; use a built-in data set"):
        load_splits(data_config([f"data.path={tmp_path / 'nothing.jsonl'}"]))


def test_data_section_is_validated_with_hints():
    with pytest.raises(ConfigError) as info:
        load_recipe(
            REPO / "recipes" / "tiny.yaml",
            ["data.val_fraction=1.5", "data.on_bad_example=ignore", "data.source=mainfest", "data.image_dri=x"],
        )
    message = str(info.value)
    assert "data.val_fraction: must be in [0, 1)" in message
    assert "data.on_bad_example: expected one of error, skip" in message
    assert "data.source: expected one of auto, builtin, imagefolder, manifest, coco, saved, hub" in message
    assert "did you mean data.image_dir?" in message


# --- the same CLI trains from every source -----------------------------------------------------


@pytest.mark.parametrize("name", list(SOURCES))
def test_training_cli_runs_from_every_source(tmp_path, tiny_base, name):
    from multimodal_lora.commands.train import main

    overrides, _ = SOURCES[name](tmp_path / "data")
    out = tmp_path / "run"
    code = main([str(REPO / "recipes" / "tiny.yaml"), *overrides, f"output_dir={out}", "train.max_steps=2", "train.batch_size=2"])
    assert code == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_json_list_manifest(tmp_path):
    names = draw_images(tmp_path, 2)
    (tmp_path / "pairs.json").write_text(json.dumps([{"image": n, "text": caption(i)} for i, n in enumerate(names)]))
    cfg = data_config([f"data.path={tmp_path / 'pairs.json'}", "data.val_fraction=0"])
    assert [e.target for e in load_splits(cfg).train] == [caption(0), caption(1)]


def test_hub_id_is_detected_and_fails_offline_with_a_clear_message():
    from multimodal_lora.data.sources import detect_source

    cfg = data_config(["data.path=ybelkada/football-dataset"])
    assert detect_source(cfg) == "hub"
    with pytest.raises(DataError, match="cannot load the hub data set 'ybelkada/football-dataset'.*Offline"):
        load_splits(cfg)


def test_dataloader_workers_decode_stored_images(tmp_path, tiny_base):
    """Arrow-backed examples travel to worker processes as references and decode there."""
    import torch
    from transformers import AutoProcessor

    from multimodal_lora.data.encoding import Collator, PairDataset

    overrides, _ = saved(tmp_path)
    splits = load_splits(data_config(overrides))
    processor = AutoProcessor.from_pretrained(tiny_base).image_processor
    dataset = PairDataset(splits.train, [{"input_ids": [5, 6], "labels": [-100, 6]}] * len(splits.train), processor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=Collator(1), num_workers=2)
    batches = list(loader)
    expected = torch.stack([processor(load_image(e.image), return_tensors="pt").pixel_values[0] for e in splits.train])
    assert torch.equal(torch.cat([b["pixel_values"] for b in batches]), expected)


def test_worker_batches_cross_as_arrays_and_come_back_equal(tmp_path, tiny_base):
    """Small tensors leave a worker as numpy arrays (no shared-memory handshake) and return as equal tensors."""
    import numpy as np
    import torch
    from transformers import AutoProcessor

    from multimodal_lora.data.encoding import SMALL_TENSOR_BYTES, Collator, PairDataset, WorkerCollator, as_tensors

    overrides, _ = saved(tmp_path)
    splits = load_splits(data_config(overrides))
    processor = AutoProcessor.from_pretrained(tiny_base).image_processor
    dataset = PairDataset(splits.train, [{"input_ids": [5, 6], "labels": [-100, 6]}] * len(splits.train), processor)
    plain = list(torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=Collator(1)))
    crossed = list(torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=WorkerCollator(Collator(1)), num_workers=1))
    assert all(isinstance(v, np.ndarray) for batch in crossed for v in batch.values())
    back = [as_tensors(batch) for batch in crossed]
    assert len(back) == len(plain)
    for ours, theirs in zip(back, plain):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    # A large tensor keeps the shared-memory route; bf16 has no numpy type.
    big = torch.zeros(SMALL_TENSOR_BYTES // 4 + 1)
    out = WorkerCollator(lambda rows: {"big": big, "bf16": big[:4].bfloat16(), "ids": torch.tensor([1, 2])})([])
    assert out["big"] is big and isinstance(out["bf16"], torch.Tensor) and isinstance(out["ids"], np.ndarray)
