"""Adapter directories: written atomically in PEFT's format, opened and checked once before loading.

An adapter directory is what ``PeftModel.from_pretrained`` reads
(``adapter_config.json`` + ``adapter_model.safetensors``), plus
``multimodal_lora.json``: which base it belongs to (name, path or hub id,
revision, config fingerprint, model family), how that base was loaded (quantization, dtype,
device kind: :class:`~multimodal_lora.model.loading.LoadSettings`) and how it was
trained (task, prompt), so that ``caption(image, adapter=DIR)`` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from multimodal_lora.core.atomic import atomic_dir, is_staging
from multimodal_lora.core.errors import AdapterError
from multimodal_lora.core.tasks import DEFAULT_VQA_TEMPLATE, TASKS
from multimodal_lora.families.base import DEFAULT_PARTS, PARTS
from multimodal_lora.model.base import BaseInfo, family_of, is_lora_target
from multimodal_lora.model.loading import LoadSettings, settings_from_record

META_FILE = "multimodal_lora.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"


@dataclass(frozen=True)
class AdapterMeta:
    """What ``multimodal_lora.json`` records about an adapter."""

    base: BaseInfo
    task: str = "caption"
    prompt: str | None = None
    prompt_template: str = DEFAULT_VQA_TEMPLATE
    load: LoadSettings | None = None
    """How the base was loaded for training; ``None`` in adapters written before it was recorded."""
    parts: tuple[str, ...] = DEFAULT_PARTS
    """What the adapter's LoRA trains (``lora.parts``); adapters written before parts existed trained
    the language model's attention only, the default."""


@dataclass(frozen=True, eq=False)
class Adapter:
    """An adapter directory opened and checked once (:func:`open_adapter`): everything loading it needs.

    Holding this value, nothing reads the directory again: :func:`check_fits`
    checks its tensors against a model, :func:`attach` gives them to PEFT.
    """

    directory: Path
    meta: AdapterMeta | None
    """``multimodal_lora.json``; ``None`` for a plain PEFT adapter written by another tool."""
    config: dict
    """``adapter_config.json`` as written."""
    tensors: dict[str, torch.Tensor]
    """The weights, checked: a whole safetensors file, every value finite."""

    @property
    def task(self) -> str:
        """``caption`` or ``vqa`` (an adapter that does not say captions)."""
        return self.meta.task if self.meta is not None else "caption"

    def lora_config(self):
        """The PEFT ``LoraConfig`` its ``adapter_config.json`` describes (as ``LoraConfig.from_pretrained`` builds it).

        Raises:
            AdapterError: PEFT cannot read it, or it is not a LoRA adapter.
        """
        from peft import LoraConfig

        try:
            kwargs = LoraConfig.check_kwargs(**{k: v for k, v in self.config.items() if k != "runtime_config"})
            config = LoraConfig.from_peft_type(**kwargs)
        except (TypeError, ValueError, KeyError) as exc:
            raise AdapterError(f"{self.directory / CONFIG_FILE}: not a LoRA adapter config PEFT can read ({exc})") from None
        if str(config.peft_type).split(".")[-1] != "LORA":
            raise AdapterError(f"{self.directory / CONFIG_FILE}: a {config.peft_type} adapter; only LoRA adapters are supported")
        return config


OPENED: dict[Path, tuple[tuple, Adapter]] = {}
"""Adapters already opened in this process, by resolved directory, with the files' ``stat`` when read.

An adapter is read once: opening it again while its files are unchanged (same inode, size
and times; a new save renames a new directory into place) returns the same value without
opening a file. :func:`multimodal_lora.inference.captioner.clear_cache` empties it."""


def open_adapter(path: str | Path | Adapter) -> Adapter:
    """Find, read and check an adapter directory: once per process while its files stay the same.

    Accepts an adapter directory or a run directory holding ``adapter/``. Reads
    ``adapter_config.json`` and ``multimodal_lora.json``, and reads
    ``adapter_model.safetensors`` once: whole (a truncated file fails here,
    naming it, rather than deep inside PEFT) and finite.

    Raises:
        AdapterError: not a complete, readable adapter directory (the message names the file).
    """
    if isinstance(path, Adapter):
        return path
    directory = find_adapter_dir(path)
    key = directory.resolve()
    stamp = _stamp(directory)
    cached = OPENED.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        adapter = _open_checked(directory)
    except OSError as exc:  # no permission, an I/O error: name the file, no traceback
        raise AdapterError(f"{exc.filename or directory}: cannot read it ({exc.strerror or exc})") from None
    OPENED[key] = (stamp, adapter)
    return adapter


def _stamp(directory: Path) -> tuple:
    """What changes when any of the adapter's files is rewritten (``stat`` only: no file is opened)."""
    stamp = []
    for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        try:
            st = (directory / name).stat()
        except FileNotFoundError:
            stamp.append(None)
            continue
        stamp.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stamp)


def attach(model, adapter: Adapter, name: str = "default"):
    """Add ``adapter`` to ``model`` under the PEFT name ``name``, frozen, from the tensors already read.

    What ``PeftModel.from_pretrained`` (the first adapter) and ``PeftModel.load_adapter``
    (the next ones) do, without reading the directory again. Call :func:`check_fits` first.

    Returns:
        The ``PeftModel`` (``model`` itself when it already was one).
    """
    from peft import PeftModel, set_peft_model_state_dict

    config = adapter.lora_config()
    config.inference_mode = True
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = PeftModel(model, config, adapter_name=name)
    set_peft_model_state_dict(model, adapter.tensors, adapter_name=name)
    model.eval()
    return model


# adapter_config.json, multimodal_lora.json and the safetensors header: a few KB at most.
_SMALL_FILES = 8 * 1024


def adapter_bytes(peft_model, state_dict: dict | None = None) -> int:
    """About the bytes of the adapter's weights as saved: its trainable tensors (or ``state_dict``'s LoRA ones).

    Said on a full disk ("it needs about ..."), before anything is written.
    """
    if state_dict is not None:
        tensors = [t for name, t in state_dict.items() if "lora_" in name or "modules_to_save" in name]
    else:
        tensors = [p for p in peft_model.parameters() if p.requires_grad]
    return sum(t.numel() * t.element_size() for t in tensors)


def save_adapter(
    peft_model,
    directory: str | Path,
    meta: AdapterMeta,
    adapter_name: str = "default",
    state_dict: dict | None = None,
    card: str | None = None,
) -> Path:
    """Write the adapter to ``directory`` so that it is there whole or not at all.

    ``state_dict`` is the model's state gathered from a sharded (FSDP) run; by
    default the model's own tensors are saved.

    The files go to a temporary directory beside the target, which is then
    renamed into place; a process killed mid-save leaves the previous adapter
    (or nothing), never a half-written one. ``card`` (the model card's text,
    see :mod:`multimodal_lora.adapter.card`) is written as ``README.md`` in the same
    directory, so the card always describes the weights beside it.

    Returns:
        The adapter directory.
    """
    directory = Path(directory)
    needed = adapter_bytes(peft_model, state_dict) + len((card or "").encode()) + _SMALL_FILES
    with atomic_dir(directory, "the adapter", needed=needed) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True, state_dict=state_dict)
        if adapter_name != "default":
            # save_pretrained puts non-default adapters in a sub-folder; keep the flat layout.
            for item in (tmp / adapter_name).iterdir():
                item.rename(tmp / item.name)
            (tmp / adapter_name).rmdir()
        _record_base(tmp / CONFIG_FILE, meta.base)
        (tmp / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
        # PEFT's save_pretrained writes a generic README.md; ours replaces it (or none is kept).
        (tmp / CARD_FILE).unlink(missing_ok=True)
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    return directory


def find_adapter_dir(path: str | Path) -> Path:
    """Accept an adapter directory, or a run directory holding ``adapter/``."""
    path = Path(path).expanduser()
    if is_staging(path.absolute()):
        raise AdapterError(
            f"adapter {str(path)!r} is a staging directory left by an interrupted save, not an adapter; "
            "use the finished one beside it (the next training run in that directory deletes it)"
        )
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
    """Validate an adapter directory and read its metadata (through :func:`open_adapter`: once per process).

    Returns:
        ``(directory, meta)``; ``meta`` is ``None`` for a plain PEFT adapter
        written by another tool.
    """
    adapter = open_adapter(path)
    return adapter.directory, adapter.meta


def _open_checked(directory: Path) -> Adapter:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{directory / CONFIG_FILE}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{directory / CONFIG_FILE}: not a PEFT adapter config (a JSON object)")
    tensors = _read_weights(directory / WEIGHTS_FILE)
    return Adapter(directory=directory, meta=_read_meta(directory / META_FILE), config=config, tensors=tensors)


def _read_meta(meta_path: Path) -> AdapterMeta | None:
    if not meta_path.is_file():
        return None
    try:
        raw = json.loads(meta_path.read_text())
        parts = tuple(raw.get("parts", DEFAULT_PARTS))
        meta = AdapterMeta(
            **{**raw, "base": BaseInfo(**raw["base"]), "load": settings_from_record(raw.get("load")), "parts": parts}
        )
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as exc:
        raise AdapterError(f"{meta_path}: unreadable ({exc}); delete it to load the adapter as a plain PEFT adapter") from None
    if meta.task not in TASKS:
        raise AdapterError(f"{meta_path}: task {meta.task!r} is not caption or vqa")
    unknown = [p for p in meta.parts if p not in PARTS]
    if unknown or not meta.parts:
        raise AdapterError(f"{meta_path}: parts {list(meta.parts)} must be drawn from {', '.join(PARTS)}")
    return meta


def check_base_matches(directory: Path, meta: AdapterMeta | None, base: BaseInfo) -> None:
    """Refuse an adapter trained on a different base (or a different family of model), naming both."""
    if meta is None:
        return
    if meta.base.family and base.family and meta.base.family != base.family:
        raise AdapterError(
            f"adapter {str(directory)!r} was trained on a {meta.base.family} model ({meta.base.name!r}), but the "
            f"loaded base {base.name!r} is a {base.family} model: an adapter only fits the family (and base) it was "
            f"trained on; load it with base_model={meta.base.name!r}"
        )
    if meta.base.fingerprint == base.fingerprint:
        return
    raise AdapterError(
        f"adapter {str(directory)!r} was trained on base {meta.base.name!r} (config fingerprint "
        f"{meta.base.fingerprint}), but the loaded base is {base.name!r} (fingerprint {base.fingerprint}); "
        f"load it with base_model={meta.base.name!r}"
    )


# PEFT saves each LoRA tensor as base_model.model.<module>.lora_A.weight (the adapter's name removed).
_PEFT_PREFIX = "base_model.model."


def check_fits(adapter: Adapter | str | Path, model, family=None) -> None:
    """Refuse an adapter that would load into ``model`` wrongly or not at all, before PEFT touches the model.

    PEFT loads such adapters with at best a warning: tensors of modules its
    ``target_modules`` do not select are dropped, modules without tensors keep
    their initial (zero) update, so a file that matches nothing gives the bare
    base, and a shape that does not fit gives a raw size-mismatch error. Here
    each is an :class:`AdapterError` naming the file, the tensor and the problem.

    Args:
        adapter: an opened adapter (:func:`open_adapter`), or its directory.
        model: the base it is about to be loaded into (bare, or a ``PeftModel`` holding other adapters).
        family: the base's (:attr:`~multimodal_lora.model.base.LoadedBase.family`); read from its config when not given.
    """
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    if not isinstance(adapter, Adapter):
        adapter = open_adapter(adapter)
    directory = adapter.directory
    weights = directory / WEIGHTS_FILE
    config = adapter.lora_config()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family or family_of(base)
    # Under a PeftModel, a LoRA layer wraps the original as .base_layer and holds lora_A/lora_B modules.
    modules = {
        name: getattr(module, "base_layer", module)
        for name, module in base.named_modules()
        if ".lora_" not in name and not name.endswith(".base_layer")
    }
    targeted = {name for name in modules if name and check_target_module_exists(config, name)}
    if not targeted:
        raise AdapterError(
            f"{directory / CONFIG_FILE}: its target_modules ({config.target_modules}) match none of the base's "
            "modules, so it would load as the bare base; it was made for another model"
        )
    found: set[str] = set()
    for key, tensor in sorted(adapter.tensors.items()):  # in the file's (sorted) order
        name = key.removeprefix(_PEFT_PREFIX)
        module_name, lora, kind = name.partition(".lora_")
        where = f"{weights}: tensor {key}"
        if not lora or kind not in ("A.weight", "B.weight"):
            raise AdapterError(f"{where} is not a LoRA A/B matrix; this package loads plain LoRA adapters only")
        # A plain PEFT adapter may adapt any part this family offers; ours, only the parts it records.
        parts = adapter.meta.parts if adapter.meta is not None else family.parts()
        if not is_lora_target(module_name, family, parts):
            raise AdapterError(f"{where} adapts {module_name}, which is {_not_in(family, parts)}; PEFT would drop or misapply it")
        if module_name not in modules:
            raise AdapterError(f"{where}: the base has no module {module_name}; the adapter was made for another model")
        if module_name not in targeted:
            raise AdapterError(
                f"{where}: {module_name} is not selected by the adapter's own target_modules "
                f"({config.target_modules}); PEFT would silently drop it"
            )
        layer = modules[module_name]
        shape = tuple(tensor.shape)
        r = config.r
        if config.rank_pattern:
            pattern = get_pattern_key(config.rank_pattern.keys(), module_name)
            r = config.rank_pattern.get(pattern, config.r)
        expected = (r, layer.in_features) if kind == "A.weight" else (layer.out_features, r)
        if shape != expected:
            raise AdapterError(
                f"{where} has shape {list(shape)}, but {module_name} of this base (in {layer.in_features}, "
                f"out {layer.out_features}) with r={r} needs {list(expected)}; the adapter was made for another model"
            )
        found.add(module_name)
    if not found:
        raise AdapterError(f"{weights}: holds no LoRA weights; it would load as the bare base")
    missing = sorted(targeted - found)
    if missing:
        raise AdapterError(
            f"{weights}: has no weights for {len(missing)} of the {len(targeted)} modules its target_modules select "
            f"(e.g. {missing[0]}); PEFT would leave those at their initial values. The file is incomplete"
        )


def _not_in(family, parts) -> str:
    """Where a stray tensor is not: the attention projections, or the parts the adapter trained."""
    if tuple(parts) == DEFAULT_PARTS:
        return f"not an attention projection of the language model ({family.name}: {', '.join(family.lora_targets)})"
    described = ", ".join(family.describe_part(part) for part in parts if part in family.parts())
    return f"not in the parts the adapter trained ({family.name}: {described})"


def adapter_parts(adapter: Adapter, family) -> tuple[str, ...]:
    """The parts an adapter's tensors adapt, whatever its record says (a plain PEFT adapter has none)."""
    found = {family.part_of(key.removeprefix(_PEFT_PREFIX).partition(".lora_")[0]) for key in adapter.tensors}
    return tuple(p for p in PARTS if p in found)


def base_of(
    directory: Path, meta: AdapterMeta | None, base: str | None = None, config: dict | None = None
) -> tuple[str, str | None]:
    """``(base, revision)`` an adapter belongs to: ``base`` if given, else its record, else PEFT's config.

    Raises:
        AdapterError: nothing says which base (a foreign adapter without
            ``base_model_name_or_path``) and ``base`` was not given.
    """
    if base is not None:
        return base, (meta.base.revision if meta is not None and meta.base.name == base else None)
    if meta is not None:
        return meta.base.name, meta.base.revision
    if config is None:
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


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights file's tensors, read once: a whole safetensors file whose every value is finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = path.read_bytes()
    _check_safetensors(path, data)
    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise AdapterError(f"{path}: unreadable safetensors file ({exc}); retrain or copy it again") from None
    _check_finite(path, tensors)
    return tensors


def _check_safetensors(path: Path, data: bytes) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then exactly the data it lists."""
    size = len(data)
    try:
        header_len = int.from_bytes(data[:8], "little")
        if size < 8 or 8 + header_len > size:
            raise ValueError("the header runs past the end of the file")
        header = json.loads(data[8 : 8 + header_len])
        data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + data_end != size:
            raise ValueError(f"expected {8 + header_len + data_end} bytes, found {size}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as exc:
        raise AdapterError(f"{path}: truncated or corrupt safetensors file ({exc}); retrain or copy it again") from None


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """NaN or inf in an adapter make every caption empty; refuse it, naming the tensor."""
    for key, tensor in sorted(tensors.items()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(
                f"{path}: tensor {key} has {bad} non-finite values (NaN or inf) of {tensor.numel()}; "
                "the run that wrote it diverged. Retrain (lower train.lr) or use an earlier checkpoint's adapter"
            )
