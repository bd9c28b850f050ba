"""Where examples come from: the built-in sets, a local imagefolder, the hub.

A source yields :class:`Example` rows; it knows nothing of models or tokens.
Images are not opened here (only referenced by path or bytes), so listing a
data set of ten thousand images costs no memory to speak of.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from multimodal_lora.config import DataConfig
from multimodal_lora.data import shapes
from multimodal_lora.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training pair: an image and its target text (a caption or an answer)."""

    image: str | bytes
    """Path of the image file, or its encoded bytes (hub data sets)."""
    target: str
    """The caption (task ``caption``) or the answer (task ``vqa``)."""
    image_id: str
    """Identifies the image: examples with the same id share an image."""
    origin: str
    """Where the row came from, for error messages: ``metadata.jsonl row 3``."""
    question: str | None = None
    """The question (task ``vqa``)."""


@dataclass
class Splits:
    """The examples of a run, split into training and validation."""

    train: list[Example]
    validation: list[Example]
    description: str
    """Human-readable: where the data came from."""


def load_splits(cfg: DataConfig) -> Splits:
    """Read the data set a recipe names.

    Raises:
        DataError: the data set cannot be found or read, naming the path, file
            or row and what to do.
    """
    kind = detect_source(cfg)
    if kind == "builtin":
        root = shapes.ensure_builtin(cfg.path)
        return _imagefolder_splits(root, cfg, f"built-in data set {cfg.path!r} ({root})")
    if kind == "imagefolder":
        return _imagefolder_splits(Path(cfg.path), cfg, f"imagefolder {cfg.path}")
    return _hub_splits(cfg)


def detect_source(cfg: DataConfig) -> str:
    """Which reader handles ``cfg.path``."""
    if cfg.source != "auto":
        if cfg.source == "builtin" and cfg.path not in shapes.BUILTIN:
            raise DataError(f"data.path: no built-in data set {cfg.path!r}; built-in: {', '.join(shapes.BUILTIN)}")
        return cfg.source
    if cfg.path in shapes.BUILTIN:
        return "builtin"
    if Path(cfg.path).exists():
        if not Path(cfg.path).is_dir():
            raise DataError(f"data.path: {cfg.path!r} is a file; an imagefolder is a directory with metadata.jsonl")
        return "imagefolder"
    if "/" in cfg.path and not cfg.path.startswith((".", "/")) and cfg.path.count("/") == 1:
        return "hub"
    raise DataError(
        f"data.path: {cfg.path!r} is neither a built-in data set ({', '.join(shapes.BUILTIN)}), "
        "a local directory, nor a hub id (owner/name)"
    )


# --- imagefolder --------------------------------------------------------------------------------


def _imagefolder_splits(root: Path, cfg: DataConfig, description: str) -> Splits:
    """An imagefolder: ``metadata.jsonl`` (or ``.csv``) beside the images, per split folder."""
    if not root.is_dir():
        raise DataError(f"data.path: {str(root)!r} does not exist")
    train_dir = root / cfg.train_split
    if _metadata_file(train_dir) is None:
        if _metadata_file(root) is not None and cfg.train_split == "train":
            train_dir = root  # a flat imagefolder: one split, everything is train
        else:
            raise DataError(
                f"{root}: no {cfg.train_split}/metadata.jsonl (or metadata.csv) and no metadata.jsonl at the top; "
                "an imagefolder has file_name and a caption column per row"
            )
    train = read_imagefolder(train_dir, cfg)
    validation: list[Example] = []
    if cfg.val_split is not None and train_dir != root and _metadata_file(root / cfg.val_split) is not None:
        validation = read_imagefolder(root / cfg.val_split, cfg)
    return Splits(train=train, validation=validation, description=description)


def _metadata_file(directory: Path) -> Path | None:
    for name in ("metadata.jsonl", "metadata.csv"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_imagefolder(directory: Path, cfg: DataConfig) -> list[Example]:
    """Read one split folder's metadata into examples (images are not opened)."""
    metadata = _metadata_file(directory)
    assert metadata is not None
    rows = _read_rows(metadata)
    examples = []
    for number, row in rows:
        origin = f"{metadata} row {number}"
        if "file_name" not in row:
            raise DataError(f"{origin}: no file_name column; imagefolder metadata names each image in file_name")
        examples.append(_example(row, str(directory / row["file_name"]), row["file_name"], origin, cfg))
    return examples


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8") from None
    if path.suffix == ".csv":
        return [(i, dict(row)) for i, row in enumerate(csv.DictReader(text.splitlines()), start=1)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} row {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} row {number}: each line must be a JSON object")
        rows.append((number, row))
    return rows


def _example(row: dict, image, image_id: str, origin: str, cfg: DataConfig) -> Example:
    column = cfg.text_column if cfg.task == "caption" else cfg.answer_column
    if column not in row:
        raise DataError(f"{origin}: no {column!r} column (columns: {', '.join(map(str, row))}); set data.{'text' if cfg.task == 'caption' else 'answer'}_column")
    question = None
    if cfg.task == "vqa":
        if cfg.question_column not in row:
            raise DataError(f"{origin}: no {cfg.question_column!r} column; set data.question_column")
        question = str(row[cfg.question_column])
    return Example(image=image, target=str(row[column]), image_id=image_id, origin=origin, question=question)


# --- hub -----------------------------------------------------------------------------------------


def _hub_splits(cfg: DataConfig) -> Splits:
    """A data set on the Hugging Face hub (or in the local ``datasets`` cache when offline)."""
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.path, revision=cfg.revision)
    except Exception as exc:  # datasets raises many types for "not there"
        raise DataError(
            f"data.path: cannot load the hub data set {cfg.path!r} ({type(exc).__name__}: {exc}). "
            "Offline, only data sets already in the datasets cache load; use a local imagefolder otherwise."
        ) from None
    if cfg.train_split not in dataset:
        raise DataError(f"data.train_split: {cfg.path!r} has no split {cfg.train_split!r}; it has {', '.join(dataset)}")
    train = _hub_examples(dataset[cfg.train_split], cfg, f"{cfg.path}[{cfg.train_split}]")
    validation = []
    if cfg.val_split is not None and cfg.val_split in dataset:
        validation = _hub_examples(dataset[cfg.val_split], cfg, f"{cfg.path}[{cfg.val_split}]")
    return Splits(train=train, validation=validation, description=f"hub data set {cfg.path}")


def _hub_examples(split, cfg: DataConfig, name: str) -> list[Example]:
    import datasets

    if cfg.image_column not in split.column_names:
        raise DataError(f"{name}: no {cfg.image_column!r} column (columns: {', '.join(split.column_names)}); set data.image_column")
    split = split.cast_column(cfg.image_column, datasets.Image(decode=False))
    examples = []
    for index, row in enumerate(split):
        image = row[cfg.image_column]
        data = image.get("bytes") or image.get("path")
        examples.append(_example(row, data, f"{name}#{index}", f"{name} row {index}", cfg))
    return examples
