"""The caption command's output file: whole rows, appended and flushed per batch, resumable.

Rows are written in input order by one process. Each batch's rows go to the
file in one ``write`` system call right after they are captioned, so a
``kill -9`` loses at most the batch in flight. If the kill lands inside that
call, the file ends in a torn row (no final newline): :func:`open_rows` with
``resume=True`` finds it, cuts it off and says so, and the run continues after
the last whole row. The file is never rewritten, only appended to (or cut back
to its last whole row), so nothing already captioned is lost.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from multimodal_lora.core.errors import UserError

logger = logging.getLogger(__name__)


def out_format(out: str) -> str:
    """``jsonl`` or ``csv`` from the file name.

    Raises:
        UserError: any other suffix.
    """
    suffix = Path(out).suffix.lower()
    if suffix in (".jsonl", ".csv"):
        return suffix[1:]
    raise UserError(f"--out {out}: name a .jsonl or .csv file")


def row_fields(question: bool) -> list[str]:
    """The columns of a row, in order."""
    return ["image", "question", "answer", "error"] if question else ["image", "caption", "error"]


@dataclass(frozen=True)
class Existing:
    """What a previous, interrupted run left in the output file."""

    rows: int
    """Whole rows already written (the header of a CSV not counted)."""
    last_image: str | None
    """The ``image`` of the last whole row: it must be the input at position ``rows - 1``."""
    torn_bytes: int
    """Bytes of a torn last row that were cut off (0: none)."""


class RowWriter:
    """Appends rows to ``path``; one :meth:`write` is one system call, then the rows are on disk's way.

    Create it with :func:`open_rows`.
    """

    def __init__(self, path: Path, fmt: str, fields: list[str], fd: int):
        self.path, self.format, self.fields, self._fd = path, fmt, fields, fd

    def write(self, rows: list[dict]) -> None:
        """Write ``rows`` whole (a kill -9 may tear only the last one; resume cuts it off)."""
        if not rows:
            return
        data = "".join(encode_row(row, self.fields, self.format) for row in rows).encode("utf-8")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            # A full disk: one line naming the file; the rows written so far stay, and --resume continues.
            from multimodal_lora.core.atomic import as_write_error

            error = as_write_error(exc, "the captions", self.path)
            raise (error.with_hint("free space and run again with --resume") if error else exc) from None

    def close(self) -> None:
        os.close(self._fd)


def encode_row(row: dict, fields: list[str], fmt: str) -> str:
    """One row as one line (CSV cells have line breaks replaced: one row is always one line)."""
    if fmt == "jsonl":
        return json.dumps({k: row[k] for k in fields if k in row}, ensure_ascii=False) + "\n"
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([" ".join(str(row.get(k, "")).splitlines()) for k in fields])
    return buffer.getvalue()


def check_out(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a job whose output file exists unless told what to do with it (before any model loads).

    Raises:
        UserError: the file exists and neither ``resume`` nor ``overwrite`` was asked for, or it is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; name a .jsonl or .csv file")
    if path.exists() and not (resume or overwrite):
        raise UserError(f"{path} exists; pass --resume to continue it, or --overwrite to start again")


def open_rows(path: Path, fmt: str, fields: list[str], *, resume: bool, overwrite: bool) -> tuple[RowWriter, Existing]:
    """Open the output file for appending, after checking what is already there.

    Args:
        resume: continue a file an interrupted run left (a torn last row is cut off).
        overwrite: start again even if the file exists.

    Raises:
        UserError: the file exists and neither ``resume`` nor ``overwrite`` was asked for,
            or it is not a file this command wrote.
    """
    path = Path(path)
    existing = Existing(0, None, 0)
    check_out(path, resume=resume, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if resume and path.exists():
        existing = read_existing(path, fmt, fields)
        if existing.torn_bytes:
            # Cut back to the last whole row: the torn one is captioned again.
            os.truncate(path, path.stat().st_size - existing.torn_bytes)
            logger.warning(
                "%s: dropped a torn last row (%d bytes) left by an interrupted run", path, existing.torn_bytes
            )
    fresh = not (resume and path.exists() and path.stat().st_size > 0)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0), 0o644)
    writer = RowWriter(path, fmt, fields, fd)
    if fresh and fmt == "csv":
        os.write(fd, (",".join(fields) + "\n").encode())
    return writer, existing


def read_existing(path: Path, fmt: str, fields: list[str]) -> Existing:
    """Count the whole rows of an existing output file, streaming it, and find a torn tail (read only).

    Raises:
        UserError: the file is not one this command wrote (another header, a row that does not parse).
    """
    rows, last_line, offset, torn = 0, None, 0, 0
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                torn = len(line)  # only the very last line can lack its newline
                break
            offset += len(line)
            if fmt == "csv" and number == 1:
                header = line.decode("utf-8", "replace").strip()
                if header != ",".join(fields):
                    raise UserError(
                        f"{path}: header {header!r} is not {','.join(fields)!r}; not this command's output (or --question changed)"
                    )
                continue
            rows += 1
            last_line = line
    if fmt == "csv" and offset == 0:
        torn = path.stat().st_size  # not even a whole header: start the file again
    last_image = None
    if last_line is not None:
        try:
            text = last_line.decode("utf-8")
            last_image = json.loads(text)["image"] if fmt == "jsonl" else next(csv.reader([text]))[0]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError, StopIteration):
            raise UserError(
                f"{path}, row {rows}: not a row this command wrote; delete the file or drop --resume"
            ) from None
    return Existing(rows, last_image, torn)
