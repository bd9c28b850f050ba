"""Every file and directory we publish appears whole or not at all, and a failed write says so in one line.

A write is staged beside its target (same file system, so the final rename is
atomic), made readable (0644 files, 0755 directories: ``mkdtemp``/``mkstemp``
and safetensors create private 0600/0700 ones), synced, and renamed into place.
If anything fails on the way, the staging copy is removed, so no partial file
or directory is left; a failure of the disk itself (full, over quota, read-only,
no permission) becomes a :class:`WriteError` naming what could not be written,
where, and how much was written before it failed. Libraries report a full disk
in their own words (torch: "file write failed", safetensors: "StorageFull"), so
those are recognised here too, in one place.

Staging names carry the writer's process id: :func:`remove_stale` deletes those
of processes that no longer run (a save killed midway), and :func:`is_staging`
lets readers refuse them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from multimodal_lora.core.errors import UserError

FILE_MODE = 0o644
DIR_MODE = 0o755
_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}
# The target itself is in the way: a directory where a file goes, a file where a directory goes, a long name.
_TARGET_ERRNOS = {errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EFBIG, errno.EIO, errno.EMLINK}
# How libraries that do not raise OSError say the disk is full.
_DISK_FULL_WORDS = re.compile(r"No space left|StorageFull|os error 28|code: 28|file write failed|Disk quota", re.I)
# .{name}-{pid}-{mkdtemp suffix}, .{name}.old-{pid}, and the older .tmp-checkpoint-* temporaries.
_STAGING = re.compile(r"\..+-(?P<pid>\d+)-[A-Za-z0-9_]{8}|\..+\.old-(?P<old>\d+)|\.tmp-checkpoint-.*")


class WriteError(UserError):
    """A file or directory could not be written; nothing partial was left behind."""

    def __init__(
        self, what: str, target: Path, reason: str, written: int | None = None, hint: str = "", needed: int | None = None
    ):
        self.what, self.target, self.reason, self.written, self.hint = what, Path(target), reason, written, hint
        self.needed = needed
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [f"could not write {self.what} to {self.target}: {self.reason}"]
        if self.reason in _DISK_ERRNOS.values():
            free = _free_bytes(self.target)
            if self.needed:
                parts.append(f"it needs about {_size(self.needed)}")
            elif self.written:
                parts.append(f"it needed more than the {_size(self.written)} written before the failure")
            if free is not None:
                parts.append(f"{_size(free)} free there")
        message = "; ".join(parts) + "; nothing partial was left"
        return message + (f". {self.hint[0].upper()}{self.hint[1:]}" if self.hint else "")

    def with_hint(self, hint: str) -> WriteError:
        """The same error with what to do next (e.g. the last intact checkpoint) appended."""
        return WriteError(self.what, self.target, self.reason, self.written, hint, self.needed)


def staging_dir(target: Path) -> Path:
    """A fresh temporary directory beside ``target``, readable like what it will become."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-{os.getpid()}-", dir=target.parent))
    tmp.chmod(DIR_MODE)
    return tmp


@contextlib.contextmanager
def atomic_dir(target: str | Path, what: str, *, if_exists: str = "replace", needed: int | None = None) -> Iterator[Path]:
    """Build a directory in a staging copy, then publish it at ``target`` in one rename.

    Args:
        target: where the directory will appear.
        what: what it is, for the error message ("checkpoint", "merged model").
        if_exists: ``replace`` an existing ``target`` (the old one is removed only after the new one
            is in place), ``keep`` it and drop ours (another process built the same thing), or ``error``.
        needed: about how many bytes it takes, when the writer knows (said on a full disk).

    Raises:
        WriteError: the disk is full (or read-only, or not ours); the staging copy is removed.
    """
    target = Path(target)
    try:
        tmp = staging_dir(target)
    except OSError as exc:
        raise _as_write_error(exc, what, target, None) or exc from None
    try:
        yield tmp
        publish(tmp)
        if target.exists() and if_exists == "error":
            raise FileExistsError(errno.EEXIST, "exists", str(target))
        if target.exists() and if_exists == "keep":
            shutil.rmtree(tmp, ignore_errors=True)
            return
        _replace_dir(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        written = _tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        error = _as_write_error(exc, what, target, written) if isinstance(exc, Exception) else None
        if error is not None:
            raise _with_needed(error, needed) from None
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, what: str, *, needed: int | None = None) -> Iterator[Path]:
    """Write a file at a temporary path beside ``target`` and rename it into place.

    ``needed``: about how many bytes it takes, when the writer knows (said on a full disk).

    Raises:
        WriteError: as :func:`atomic_dir`.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}-{os.getpid()}-", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise _with_needed(_as_write_error(exc, what, target, None), needed) or exc from None
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(FILE_MODE)
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.exists() else None
        tmp.unlink(missing_ok=True)
        error = _as_write_error(exc, what, target, written) if isinstance(exc, Exception) else None
        if error is not None:
            raise _with_needed(error, needed) from None
        raise


def as_write_error(exc: BaseException, what: str, target: str | Path, needed: int | None = None) -> WriteError | None:
    """For writers that cannot stage (an append to a log): a :class:`WriteError` if ``exc`` is the disk's fault."""
    return _with_needed(_as_write_error(exc, what, Path(target), None), needed)


def _with_needed(error: WriteError | None, needed: int | None) -> WriteError | None:
    """``error`` saying the bytes it needs (what a nested write knew, else the writer's ``needed``)."""
    if error is None or not needed or error.needed:
        return error
    return WriteError(error.what, error.target, error.reason, error.written, error.hint, needed)


def write_text(target: str | Path, text: str, what: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    data = text.encode("utf-8")
    with atomic_file(target, what, needed=len(data) or None) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def publish(directory: Path) -> None:
    """Make a staged tree readable (0644 / 0755) and sync its files to disk."""
    for root, dirs, files in os.walk(directory):
        os.chmod(root, DIR_MODE)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, FILE_MODE)
            _fsync_file(Path(path))
        for name in dirs:
            os.chmod(os.path.join(root, name), DIR_MODE)


def is_staging(path: str | Path) -> bool:
    """Whether ``path`` is (or lies inside) a staging directory: never a finished adapter or model."""
    return any(_STAGING.fullmatch(part) for part in Path(path).parts)


def remove_stale(directory: str | Path) -> list[Path]:
    """Delete the staging copies in ``directory`` left by processes that no longer run.

    Returns:
        What was removed.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = _STAGING.fullmatch(path.name)
        if not match:
            continue
        pid = match.group("pid") or match.group("old")
        if pid is not None and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another run is writing it right now
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_tree(path: str | Path) -> None:
    """Delete the directory (or file) ``path`` so that it vanishes at once: renamed aside, then removed.

    A process killed while deleting leaves a staging name (removed by :func:`remove_stale`
    later), never a half-emptied directory under its real name, e.g. a checkpoint without
    its ``state.json`` that resume would pick.
    """
    path = Path(path)
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an existing directory there."""
    if target.is_file() or target.is_symlink():
        raise NotADirectoryError(errno.ENOTDIR, "a file is there, not a directory", str(target))
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _as_write_error(exc: BaseException, what: str, target: Path, written: int | None) -> WriteError | None:
    """A :class:`WriteError` when ``exc`` (or what caused it) is a failure of the disk; else ``None``."""
    if isinstance(exc, WriteError):  # a nested write failed: report it as the outer one
        return WriteError(what, target, exc.reason, written or exc.written, needed=exc.needed)
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRNOS:
            return WriteError(what, target, _DISK_ERRNOS[seen.errno], written)
        if isinstance(seen, OSError) and seen.errno in _DENIED_ERRNOS:
            return WriteError(what, target, f"permission denied ({seen.filename or target})", written)
        if isinstance(seen, OSError) and seen.errno in _TARGET_ERRNOS:
            return WriteError(what, target, str(seen.strerror).lower(), written)
        if isinstance(seen, FileExistsError):
            return WriteError(what, target, f"{seen.filename or target} already exists", written)
        if not isinstance(seen, OSError) and _DISK_FULL_WORDS.search(str(seen)):
            return WriteError(what, target, "no space left on device", written)
        seen = seen.__cause__ or seen.__context__
    # torch and others can fail with a generic message when the disk fills; the free space tells.
    free = _free_bytes(target)
    if free is not None and free < 64 * 1024 and isinstance(exc, (OSError, RuntimeError)):
        return WriteError(what, target, "no space left on device", written)
    return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def _free_bytes(target: Path) -> int | None:
    for place in (target, *target.parents):
        if place.exists():
            try:
                return shutil.disk_usage(place).free
            except OSError:
                return None
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def require_free_space(directory: str | Path, needed: int, what: str) -> None:
    """Refuse, before writing anything, when ``directory``'s file system has less than ``needed`` bytes free.

    For writes whose size is known up front (the image feature cache): failing now costs
    nothing, failing after an hour of building costs the hour.

    Args:
        directory: where the bytes will go (its nearest existing ancestor is measured).
        needed: bytes about to be written.
        what: what they are, with how the size was reckoned, for the message.

    Raises:
        WriteError: naming what, where, the bytes needed and the bytes free.
    """
    free = _free_bytes(Path(directory))
    if free is not None and needed > free:
        raise WriteError(
            what, Path(directory), _DISK_ERRNOS[errno.ENOSPC], needed=needed,
            hint="Free some space, or point the cache elsewhere with MULTIMODAL_LORA_CACHE",
        )  # fmt: skip


def format_bytes(n: int) -> str:
    """``1536`` → ``'1.5 KB'``: sizes for people, as every message here writes them."""
    return _size(n)
