"""Adapter directories: written atomically in PEFT's format, checked before loading.

An adapter directory is what ``PeftModel.from_pretrained`` reads
(``adapter_config.json`` + ``adapter_model.safetensors``), plus
``multimodal_lora.json``: which base it belongs to (name, path or hub id,
revision, config fingerprint), how that base was loaded (quantization, dtype,
device kind: :class:`~multimodal_lora.loading.LoadSettings`) and how it was
trained (task, prompt), so that ``caption(image, adapter=DIR)`` needs nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from multimodal_lora.atomic import staging_dir
from multimodal_lora.errors import AdapterError
from multimodal_lora.loading import LoadSettings, settings_from_record
from multimodal_lora.model import BaseInfo

META_FILE = "multimodal_lora.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterMeta:
    """What ``multimodal_lora.json`` records about an adapter."""

    base: BaseInfo
    task: str = "caption"
    prompt: str | None = None
    prompt_template: str = "Question: {question} Answer:"
    load: LoadSettings | None = None
    """How the base was loaded for training; ``None`` in adapters written before it was recorded."""


def save_adapter(peft_model, directory: str | Path, meta: AdapterMeta, adapter_name: str = "default") -> Path:
    """Write the adapter to ``directory`` so that it is there whole or not at all.

    The files go to a temporary directory beside the target, which is then
    renamed into place; a process killed mid-save leaves the previous adapter
    (or nothing), never a half-written one.

    Returns:
        The adapter directory.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(directory)
    try:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True)
        if adapter_name != "default":
            # save_pretrained puts non-default adapters in a sub-folder; keep the flat layout.
            for item in (tmp / adapter_name).iterdir():
                item.rename(tmp / item.name)
            (tmp / adapter_name).rmdir()
        _record_base(tmp / CONFIG_FILE, meta.base)
        (tmp / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
        for path in (tmp / CONFIG_FILE, tmp / WEIGHTS_FILE, tmp / META_FILE):
            _fsync(path)
        _replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def find_adapter_dir(path: str | Path) -> Path:
    """Accept an adapter directory, or a run directory holding ``adapter/``."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter {str(path)!r} does not exist; pass the directory the trainer wrote (OUTPUT_DIR/adapter)")
    if not path.is_dir():
        raise AdapterError(f"adapter {str(path)!r} is a file; pass the adapter's directory")
    if not (path / CONFIG_FILE).is_file() and (path / "adapter" / CONFIG_FILE).is_file():
        path = path / "adapter"
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"adapter {str(path)!r} has no {CONFIG_FILE}; it is not a PEFT adapter directory")
    if not (path / WEIGHTS_FILE).is_file():
        raise AdapterError(f"adapter {str(path)!r} has no {WEIGHTS_FILE}; the adapter is incomplete")
    return path


def read_adapter(path: str | Path) -> tuple[Path, AdapterMeta | None]:
    """Validate an adapter directory and read its metadata.

    Checks the weights file opens as safetensors (a truncated file fails here,
    naming it, rather than deep inside PEFT).

    Returns:
        ``(directory, meta)``; ``meta`` is ``None`` for a plain PEFT adapter
        written by another tool.
    """
    directory = find_adapter_dir(path)
    try:
        json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{directory / CONFIG_FILE}: not valid JSON ({exc})") from None
    _check_safetensors(directory / WEIGHTS_FILE)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return directory, None
    try:
        raw = json.loads(meta_path.read_text())
        meta = AdapterMeta(**{**raw, "base": BaseInfo(**raw["base"]), "load": settings_from_record(raw.get("load"))})
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise AdapterError(f"{meta_path}: unreadable ({exc}); delete it to load the adapter as a plain PEFT adapter") from None
    return directory, meta


def check_base_matches(directory: Path, meta: AdapterMeta | None, base: BaseInfo) -> None:
    """Refuse an adapter trained on a different base, naming both."""
    if meta is None or meta.base.fingerprint == base.fingerprint:
        return
    raise AdapterError(
        f"adapter {str(directory)!r} was trained on base {meta.base.name!r} (config fingerprint "
        f"{meta.base.fingerprint}), but the loaded base is {base.name!r} (fingerprint {base.fingerprint}); "
        f"load it with base_model={meta.base.name!r}"
    )


def base_of(directory: Path, meta: AdapterMeta | None, base: str | None = None) -> tuple[str, str | None]:
    """``(base, revision)`` an adapter belongs to: ``base`` if given, else its record, else PEFT's config.

    Raises:
        AdapterError: nothing says which base (a foreign adapter without
            ``base_model_name_or_path``) and ``base`` was not given.
    """
    if base is not None:
        return base, (meta.base.revision if meta is not None and meta.base.name == base else None)
    if meta is not None:
        return meta.base.name, meta.base.revision
    config = json.loads((directory / CONFIG_FILE).read_text())
    if not config.get("base_model_name_or_path"):
        raise AdapterError(f"adapter {str(directory)!r} does not say which base it belongs to; pass the base (base_model= or --base)")
    return config["base_model_name_or_path"], config.get("revision")


def adapter_size_bytes(directory: str | Path) -> int:
    """Bytes on disk of the adapter's files."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


def _record_base(config_path: Path, base: BaseInfo) -> None:
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base.name_or_path
    config["revision"] = base.revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then exactly the data it lists."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + header_len > size:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(f.read(header_len))
        data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + data_end != size:
            raise ValueError(f"expected {8 + header_len + data_end} bytes, found {size}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: truncated or corrupt safetensors file ({exc}); retrain or copy it again") from None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an existing directory there."""
    if target.is_file():
        raise AdapterError(f"{target} is a file; cannot write the adapter there")
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
