"""Where examples come from, and how they are split into training and validation.

A source yields :class:`Example` rows; it knows nothing of models or tokens.
Images are not opened here, only referenced by path (or, for hub and saved
data sets, by row of the memory-mapped table), so listing a data set of ten thousand
images costs no decoded pixels. Unreadable images and empty captions are
found later, by :func:`multimodal_lora.data.screen.screen_examples`.

The sources, chosen by the recipe's ``data.source`` (``auto`` decides from
``data.path``):

==============  ============================================================
``builtin``     ``shapes`` / ``shapes-vqa``, generated into the cache
``imagefolder`` a directory with ``metadata.jsonl`` or ``metadata.csv``
                (``file_name`` + caption column), flat or one folder per split
``manifest``    a ``.jsonl``, ``.csv`` or ``.json`` (list of rows) file anywhere;
                image paths are relative to it (or to ``data.image_dir``)
``coco``        a COCO captions JSON: ``images[].file_name`` and
                ``annotations[].image_id/caption``
``saved``       a directory written by ``datasets.save_to_disk``
``hub``         a Hugging Face hub data set id (``owner/name``)
==============  ============================================================

Splits: the source's validation split when it has one; otherwise
``data.val_fraction`` of the *images* (not of the pairs) are held out, chosen
by ``data.split_seed``, so an image never lands in both splits and the same
recipe always holds out the same images.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from multimodal_lora.config import DataConfig
from multimodal_lora.core.errors import DataError
from multimodal_lora.data import shapes
from multimodal_lora.data.images import StoredImage

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".json")


@dataclass(frozen=True)
class Example:
    """One training pair: an image and its target text (a caption or an answer)."""

    image: str | bytes | StoredImage
    """Path of the image file, its encoded bytes, or a reference into an Arrow data set
    (hub and saved data sets) that is read when the image is decoded."""
    target: str
    """The caption (task ``caption``) or the answer (task ``vqa``)."""
    image_id: str
    """Identifies the image across the whole data set: examples with the same id
    share an image (several captions of one image, several questions about it).
    For files it is the absolute path; for hub rows ``name[split]#index``."""
    origin: str
    """Where the row came from, for error messages: ``.../metadata.jsonl row 3``."""
    question: str | None = None
    """The question (task ``vqa``)."""


@dataclass(frozen=True)
class BadExample:
    """An example left out of training, and why."""

    split: str
    origin: str
    """The metadata file and row, as in :attr:`Example.origin`."""
    image: str
    """The image's path (or its hub row) as the metadata named it."""
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.image}: {self.reason}"


@dataclass
class Splits:
    """The examples of a run, split into training and validation."""

    train: list[Example]
    validation: list[Example]
    description: str
    """Human-readable: where the data came from."""
    held_out: str = ""
    """Human-readable: how the validation examples were chosen."""
    bad: list[BadExample] = field(default_factory=list)
    """Examples left out because they cannot be used (filled by ``screen_examples``)."""

    def num_images(self, split: str) -> int:
        """Distinct images in ``train`` or ``validation``."""
        return len({e.image_id for e in getattr(self, split)})


def group_references(examples: list[Example]) -> list[tuple[Example, list[str]]]:
    """Group examples that ask the same thing of the same image, for evaluation.

    Several captions of one image (or several answers to one question about it)
    are several training pairs but one evaluation item: generate once, score
    against every reference.

    Returns:
        ``(first example, all its reference targets)`` per distinct
        ``(image_id, question)``, in order of first appearance.
    """
    groups: dict[tuple[str, str | None], tuple[Example, list[str]]] = {}
    for example in examples:
        key = (example.image_id, example.question)
        if key not in groups:
            groups[key] = (example, [])
        groups[key][1].append(example.target)
    return list(groups.values())


def load_splits(cfg: DataConfig) -> Splits:
    """Read the data set a recipe names and split it into training and validation.

    Images are not opened; see :func:`multimodal_lora.data.screen.screen_examples`.

    Raises:
        DataError: the data set cannot be found or read, naming the path, file
            or row and what to do.
    """
    kind = detect_source(cfg)
    if kind == "builtin":
        root = shapes.ensure_builtin(cfg.path)
        train, validation = _imagefolder(root, cfg)
        description = f"built-in data set {cfg.path!r} ({root})"
    elif kind == "imagefolder":
        train, validation = _imagefolder(Path(cfg.path), cfg)
        description = f"imagefolder {cfg.path}"
    elif kind in ("manifest", "coco"):
        read = read_manifest if kind == "manifest" else read_coco
        train = read(Path(cfg.path), cfg)
        validation = read(Path(cfg.val_path), cfg) if cfg.val_path else None
        description = f"{kind} {cfg.path}" + (f" (validation: {cfg.val_path})" if cfg.val_path else "")
    elif kind == "saved":
        train, validation = _saved(cfg)
        description = f"saved data set {cfg.path}"
    else:
        train, validation = _hub(cfg)
        description = f"hub data set {cfg.path}"
    return split_examples(train, validation, cfg, description)


def split_examples(train: list[Example], validation: list[Example] | None, cfg: DataConfig, description: str) -> Splits:
    """Use the source's validation examples, or hold out ``val_fraction`` of the images.

    Either way no image is in both splits: pairs in ``train`` whose image is
    also in the source's validation split are dropped from ``train`` (with a
    warning), since training on them would make the validation numbers lie.
    """
    if validation is not None:
        val_ids = {e.image_id for e in validation}
        overlap = [e for e in train if e.image_id in val_ids]
        if overlap:
            logger.warning(
                "%d training pairs use images that are also in the validation split (first: %s); "
                "they were left out of training",
                len(overlap),
                overlap[0].origin,
            )
            train = [e for e in train if e.image_id not in val_ids]
        where = f"the file {cfg.val_path}" if cfg.val_path else f"the source's {cfg.val_split!r} split"
        return Splits(train, validation, description, held_out=where)
    train, held = hold_out(train, cfg.val_fraction, cfg.split_seed)
    how = (
        f"{len({e.image_id for e in held})} images held out (data.val_fraction={cfg.val_fraction:g}, "
        f"data.split_seed={cfg.split_seed})"
        if held
        else "nothing (no validation split, and data.val_fraction is 0 or the data too small)"
    )
    return Splits(train, held, description, held_out=how)


def hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split by image: ``round(fraction × images)`` images (at least one, never all) go to validation.

    The image ids are sorted before the seeded shuffle, so the choice does not
    depend on the order of the rows, only on which images there are.
    """
    ids = sorted({e.image_id for e in examples})
    if fraction <= 0 or len(ids) < 2:
        return examples, []
    count = min(max(1, round(len(ids) * fraction)), len(ids) - 1)
    random.Random(seed).shuffle(ids)
    held = set(ids[:count])
    return [e for e in examples if e.image_id not in held], [e for e in examples if e.image_id in held]


# --- which source -------------------------------------------------------------------------------


def detect_source(cfg: DataConfig) -> str:
    """Which reader handles ``cfg.path``: the recipe's ``data.source``, or a guess from the path."""
    path = Path(cfg.path)
    if cfg.source == "builtin" or (cfg.source == "auto" and cfg.path in shapes.BUILTIN):
        if cfg.path not in shapes.BUILTIN:
            raise DataError(f"data.path: no built-in data set {cfg.path!r}; built-in: {', '.join(shapes.BUILTIN)}")
        return "builtin"
    if cfg.source == "hub":
        return "hub"
    if cfg.source != "auto":
        if not path.exists():
            raise DataError(f"data.path: {cfg.path!r} does not exist (data.source is {cfg.source})")
        wants_dir = cfg.source in ("imagefolder", "saved")
        if path.is_dir() != wants_dir:
            what = "a directory" if wants_dir else "a file"
            raise DataError(f"data.path: a {cfg.source} source is {what}, and {cfg.path!r} is not")
        return cfg.source
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "saved"
        return "imagefolder"
    if path.is_file():
        if path.suffix.lower() == ".json" and _looks_like_coco(path):
            return "coco"
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            return "manifest"
        raise DataError(
            f"data.path: {cfg.path!r} is a file but not a manifest (.jsonl, .csv, .json) or a COCO captions JSON"
        )
    if cfg.path.count("/") == 1 and not cfg.path.startswith((".", "/", "~")) and not path.suffix:
        return "hub"
    raise DataError(
        f"data.path: {cfg.path!r} does not exist; use a built-in data set ({', '.join(shapes.BUILTIN)}), "
        "a local directory or file, or a hub id (owner/name)"
    )


def _looks_like_coco(path: Path) -> bool:
    """A JSON object is COCO; a JSON list is a manifest. Reads only the start: COCO files are large."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096)
    return head.lstrip().startswith("{")


# --- imagefolder --------------------------------------------------------------------------------


def _imagefolder(root: Path, cfg: DataConfig) -> tuple[list[Example], list[Example] | None]:
    """An imagefolder: ``metadata.jsonl`` (or ``.csv``) beside the images, flat or per split folder."""
    if not root.is_dir():
        raise DataError(f"data.path: {str(root)!r} does not exist")
    train_dir = root / cfg.train_split
    if _metadata_file(train_dir) is None:
        if _metadata_file(root) is None:
            raise DataError(
                f"{root}: no {cfg.train_split}/metadata.jsonl (or metadata.csv) and no metadata.jsonl at the top; "
                "an imagefolder has a file_name and a caption column per row"
            )
        return read_imagefolder(root, cfg), None  # flat: one split, validation is held out
    train = read_imagefolder(train_dir, cfg)
    validation = None
    if cfg.val_split is not None and _metadata_file(root / cfg.val_split) is not None:
        validation = read_imagefolder(root / cfg.val_split, cfg)
    return train, validation


def _metadata_file(directory: Path) -> Path | None:
    for name in ("metadata.jsonl", "metadata.csv"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_imagefolder(directory: Path, cfg: DataConfig) -> list[Example]:
    """Read one imagefolder directory's metadata into examples (images are not opened)."""
    metadata = _metadata_file(directory)
    if metadata is None:
        raise DataError(f"{directory}: no metadata.jsonl or metadata.csv")
    return _file_examples(metadata, directory, "file_name", cfg)


def read_manifest(path: Path, cfg: DataConfig) -> list[Example]:
    """A JSONL, CSV or JSON-list manifest: one row per pair, image paths relative to it.

    The image column is ``data.image_column``, or ``file_name`` when the rows
    have no such column (imagefolder metadata read as a manifest).
    """
    if not path.is_file():
        raise DataError(f"manifest {str(path)!r} does not exist")
    image_dir = Path(cfg.image_dir) if cfg.image_dir else path.parent
    return _check_images_found(_file_examples(path, image_dir, cfg.image_column, cfg), path, image_dir, cfg)


def _check_images_found(examples: list[Example], source: Path, image_dir: Path, cfg: DataConfig) -> list[Example]:
    """A file whose image paths all miss is a wrong ``image_dir``, not a set of bad rows: say so once."""
    paths = {e.image for e in examples if isinstance(e.image, str) and e.image}
    if paths and not any(os.path.exists(p) for p in paths):
        where = f"data.image_dir ({image_dir})" if cfg.image_dir else f"the file's own directory {image_dir} (data.image_dir is not set)"
        raise DataError(
            f"{source}: none of its {len(paths)} images exist under {where} (e.g. {sorted(paths)[0]}); "
            f"set data.image_dir to the directory its file names are relative to, e.g. data.image_dir=/data/coco/train2017"
        )
    return examples


def _file_examples(metadata: Path, image_dir: Path, image_column: str, cfg: DataConfig) -> list[Example]:
    examples = []
    for number, row in _read_rows(metadata):
        origin = f"{metadata} row {number}"
        column = image_column if image_column in row or "file_name" not in row else "file_name"
        if column not in row:
            raise DataError(
                f"{origin}: no {image_column!r} column (columns: {', '.join(map(str, row))}); "
                "set data.image_column to the column with the image path"
            )
        name = row[column]
        if not isinstance(name, str):
            name = "" if name is None else str(name)
        image = os.path.abspath(image_dir / name) if name.strip() else ""
        examples.extend(_examples(row, image, image or f"{origin} (no image)", origin, cfg))
    return examples


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """Rows of a JSONL, CSV or JSON-list file, with their row numbers (1 = first data row)."""
    text = _read_text(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV; the first line names the columns, e.g. file_name,text")
        return [(number, dict(row)) for number, row in enumerate(reader, start=1)]
    if path.suffix.lower() == ".json":
        items = _parse_json(text, path)
        if not isinstance(items, list):
            raise DataError(f"{path}: a JSON manifest is a list of objects (one per pair)")
        rows = list(enumerate(items, start=1))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append((number, _parse_json(line, f"{path} row {number}")))
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path} row {number}: each row must be a JSON object")
    return rows


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: a byte-order mark (as spreadsheet programs write) would otherwise glue onto the first header.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None


def _parse_json(text: str, where) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def _examples(row: dict, image: str | bytes, image_id: str, origin: str, cfg: DataConfig) -> list[Example]:
    """The pairs in one row: one per caption when the caption column holds a list."""
    key = "text" if cfg.task == "caption" else "answer"
    column = cfg.text_column if cfg.task == "caption" else cfg.answer_column
    if column not in row:
        raise DataError(
            f"{origin}: no {column!r} column (columns: {', '.join(map(str, row))}); set data.{key}_column"
        )
    question = None
    if cfg.task == "vqa":
        if cfg.question_column not in row:
            raise DataError(
                f"{origin}: no {cfg.question_column!r} column (columns: {', '.join(map(str, row))}); "
                "set data.question_column"
            )
        question = _text(row[cfg.question_column])
    value = row[column]
    targets = value if isinstance(value, list) else [value]
    if not targets:
        targets = [""]  # an empty list of captions is an empty caption: screened out, not silently lost
    return [Example(image, _text(t), image_id, origin, question) for t in targets]


def _text(value) -> str:
    # JSON null and CSV's empty field both mean "no text": an empty target, caught by the screen.
    return "" if value is None else str(value)


# --- COCO captions ------------------------------------------------------------------------------


def read_coco(path: Path, cfg: DataConfig) -> list[Example]:
    """A COCO captions JSON: one pair per annotation, image paths relative to ``data.image_dir``.

    Images without an annotation are not used; an annotation whose
    ``image_id`` names no image is an error in the file.
    """
    if cfg.task != "caption":
        raise DataError(f"{path}: a COCO captions file holds captions; task {cfg.task} needs a manifest with questions")
    if not path.is_file():
        raise DataError(f"COCO file {str(path)!r} does not exist")
    data = _parse_json(_read_text(path), path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: a COCO captions file is an object with 'images' and 'annotations' lists")
    image_dir = Path(cfg.image_dir) if cfg.image_dir else path.parent
    files: dict = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataError(f"{path} images[{index}]: needs 'id' and 'file_name'")
        files[image["id"]] = os.path.abspath(image_dir / str(image["file_name"]))
    examples = []
    for index, annotation in enumerate(data["annotations"]):
        origin = f"{path} annotations[{index}]"
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            raise DataError(f"{origin}: needs 'image_id' and 'caption'")
        if annotation["image_id"] not in files:
            raise DataError(f"{origin}: image_id {annotation['image_id']!r} is not in 'images'")
        image = files[annotation["image_id"]]
        examples.append(Example(image, _text(annotation["caption"]), image, origin))
    unused = len(files) - len({e.image_id for e in examples})
    if unused:
        logger.info("%s: %d images have no caption and are not used", path, unused)
    return _check_images_found(examples, path, image_dir, cfg)


# --- Arrow data sets: saved to disk, or from the hub ----------------------------------------------


def _saved(cfg: DataConfig) -> tuple[list[Example], list[Example] | None]:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(cfg.path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"data.path: {cfg.path!r} is not a data set saved with save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.Dataset):
        return _arrow_examples(loaded, cfg, f"{cfg.path}", Path(cfg.path)), None
    return _arrow_splits(loaded, cfg, cfg.path, Path(cfg.path))


def _hub(cfg: DataConfig) -> tuple[list[Example], list[Example] | None]:
    """A data set on the Hugging Face hub (or in the local ``datasets`` cache when offline)."""
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.path, revision=cfg.revision)
    except Exception as exc:  # datasets raises many types for "not there"
        raise DataError(
            f"data.path: cannot load the hub data set {cfg.path!r} ({type(exc).__name__}: {exc}). "
            "Offline, only data sets already in the datasets cache load; use a local imagefolder otherwise."
        ) from None
    return _arrow_splits(dataset, cfg, cfg.path, Path.cwd())


def _arrow_splits(dataset, cfg: DataConfig, name: str, root: Path) -> tuple[list[Example], list[Example] | None]:
    if cfg.train_split not in dataset:
        raise DataError(f"data.train_split: {name!r} has no split {cfg.train_split!r}; it has {', '.join(dataset)}")
    train = _arrow_examples(dataset[cfg.train_split], cfg, f"{name}[{cfg.train_split}]", root)
    validation = None
    if cfg.val_split is not None and cfg.val_split in dataset:
        validation = _arrow_examples(dataset[cfg.val_split], cfg, f"{name}[{cfg.val_split}]", root)
    return train, validation


def _arrow_examples(split, cfg: DataConfig, name: str, root: Path) -> list[Example]:
    """Rows of an Arrow data set. The image column is not read here: each example holds a
    :class:`StoredImage` reference into the memory-mapped table, read when the image is decoded."""
    import datasets

    if cfg.image_column not in split.column_names:
        raise DataError(
            f"{name}: no {cfg.image_column!r} column (columns: {', '.join(split.column_names)}); set data.image_column"
        )
    if isinstance(split.features[cfg.image_column], datasets.Image):
        split = split.cast_column(cfg.image_column, datasets.Image(decode=False))
    text_only = split.remove_columns([cfg.image_column])
    examples = []
    for index, row in enumerate(text_only):
        image = StoredImage(split, cfg.image_column, index, str(root.resolve()))
        examples.extend(_examples(row, image, f"{name}#{index}", f"{name} row {index}", cfg))
    return examples


def with_examples(splits: Splits, train: list[Example], validation: list[Example], **changes) -> Splits:
    """A copy of ``splits`` with other examples (and any other field changed)."""
    return replace(splits, train=train, validation=validation, **changes)
