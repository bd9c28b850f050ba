"""What the caption command captions: image paths, listed lazily, in a fixed order.

An input is an image file, a directory (its images, sorted by name), a quoted
glob (its matches, sorted), a text file of paths (``.txt``, one per line; blank
lines and ``#`` comments skipped), or a manifest (``.jsonl`` or ``.csv``) with
an ``image`` column (or ``file_name``, ``path``). Relative paths in a list or a
manifest start at that file's directory, as in the training data's manifests.

:func:`iter_inputs` is a generator: a text file or manifest of a million paths
is read line by line as captioning goes, never held as a list. The order is the
order of the arguments and, within each, of its lines (or sorted names), so two
listings of the same inputs agree: processes share the work by position in it,
and ``--resume`` skips the first rows already written.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from multimodal_lora.core.errors import UserError

# What a directory argument expands to (case-insensitive); other files there are ignored.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LIST_SUFFIXES = {".txt"}
MANIFEST_SUFFIXES = {".jsonl", ".csv"}
IMAGE_COLUMNS = ("image", "file_name", "path")
"""Manifest columns that may hold the image path, in the order they are looked for."""


def check_inputs(items: list[str]) -> None:
    """Fail now, naming the argument, for a directory, glob, list or manifest that cannot be read.

    Cheap: opens each list or manifest and reads its first row; does not list everything.

    Raises:
        UserError: a directory with no images, a glob with no match, an unreadable list or manifest.
    """
    for item in items:
        next(iter(_expand(item)), None)


def iter_inputs(items: list[str]) -> Iterator[str]:
    """Every image path the arguments name, in order, lazily.

    A name that is neither a file, a directory, a list, a manifest nor a glob
    with matches is passed on as it is, so that it is reported as missing in
    the output like any unreadable image.
    """
    for item in items:
        yield from _expand(item)


def count_inputs(items: list[str]) -> int:
    """How many paths :func:`iter_inputs` yields (one streamed pass; for the progress bar's ETA)."""
    return sum(1 for _ in iter_inputs(items))


def _expand(item: str) -> Iterator[str]:
    if os.path.isdir(item):
        # The names of one directory are sorted (a stable order needs them all); nothing else is held.
        found = sorted(
            e.name for e in os.scandir(item) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
        )
        if not found:
            raise UserError(f"{item}: directory has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        yield from (os.path.join(item, name) for name in found)
    elif glob.has_magic(item) and not os.path.exists(item):
        found = sorted(p for p in glob.iglob(item, recursive=True) if os.path.isfile(p))
        if not found:
            raise UserError(f"{item}: no files match this pattern")
        yield from found
    elif os.path.isfile(item) and Path(item).suffix.lower() in LIST_SUFFIXES:
        yield from _read_list(Path(item))
    elif os.path.isfile(item) and Path(item).suffix.lower() in MANIFEST_SUFFIXES:
        yield from _read_manifest(Path(item))
    else:
        yield item


def _resolve(base: Path, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def _read_list(path: Path) -> Iterator[str]:
    base = path.parent
    with _open_text(path) as f:
        try:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield _resolve(base, line)
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; a list of images is one path per line") from None


def _read_manifest(path: Path) -> Iterator[str]:
    base = path.parent
    with _open_text(path) as f:
        try:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                column = _image_column(path, reader.fieldnames or [])
                for row_number, row in enumerate(reader, start=2):
                    yield _resolve(base, _cell(path, row_number, row.get(column), column))
            else:
                column = None
                for row_number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path}, line {row_number}: not valid JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path}, line {row_number}: a manifest row is a JSON object")
                    column = column or _image_column(path, list(row))
                    yield _resolve(base, _cell(path, row_number, row.get(column), column))
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None


def _open_text(path: Path):
    try:
        return path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def _image_column(path: Path, columns: list[str]) -> str:
    for name in IMAGE_COLUMNS:
        if name in columns:
            return name
    raise UserError(
        f"{path}: no image column; name it one of {', '.join(IMAGE_COLUMNS)} (columns: {', '.join(columns) or 'none'})"
    )


def _cell(path: Path, row_number: int, value, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}, row {row_number}: {column!r} is empty; every row needs an image path")
    return value.strip()
