"""Which adapters there are, and which base they need: discovery and the one base decision.

:func:`find_adapters` (a directory of runs, for the demo and the server) and
:func:`collect_adapters` (that plus ``NAME=DIR`` pairs) open each adapter once
(:func:`~multimodal_lora.adapter.files.open_adapter`). :func:`base_for` decides,
for one adapter or several, which base to load and how; ``caption()``, ``ask()``,
``Captioner.for_adapter``, the caption CLI, ``evaluate``, the demo and the server
all ask it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from multimodal_lora.adapter.files import CONFIG_FILE, Adapter, base_of, open_adapter
from multimodal_lora.core.errors import AdapterError, ConfigError
from multimodal_lora.model.loading import LoadSettings, resolve

CHECKPOINTS = "checkpoints"
"""A run directory's checkpoints (``OUTPUT_DIR/checkpoints/checkpoint-N/adapter``): never offered as adapters."""
SEARCH_DEPTH = 4
DEFAULT_BASE = "tiny"


@dataclass
class Found:
    """What :func:`find_adapters` (or :func:`collect_adapters`) found."""

    adapters: dict[str, Path] = field(default_factory=dict)
    """Name → adapter directory."""
    tasks: dict[str, str] = field(default_factory=dict)
    """Name → ``caption`` or ``vqa``."""
    problems: list[str] = field(default_factory=list)
    """Adapters that cannot be used (listed as unusable in the page), and why."""
    opened: dict[str, Adapter] = field(default_factory=dict, repr=False)
    """Name → the adapter as opened (no file is read again to load it)."""

    def add(self, name: str, adapter: Adapter) -> None:
        self.adapters[name] = adapter.directory
        self.tasks[name] = adapter.task
        self.opened[name] = adapter

    def drop(self, name: str) -> None:
        for table in (self.adapters, self.tasks, self.opened):
            table.pop(name, None)

    @property
    def base(self) -> str | None:
        """The base the first usable adapter with a record was trained on."""
        first = self._first_recorded()
        return first.meta.base.name if first is not None else None

    @property
    def load(self) -> LoadSettings | None:
        """How that adapter's base was loaded for training (``None``: not recorded)."""
        first = self._first_recorded()
        return first.meta.load if first is not None else None

    def _first_recorded(self) -> Adapter | None:
        return next((a for a in self.opened.values() if a.meta is not None), None)


def find_adapters(root: str | Path) -> Found:
    """Every adapter directory under ``root`` (a run directory's ``adapter/`` is named after the run).

    A run's checkpoints are left out: the finished run's ``adapter/`` is what to show.

    Broken adapter directories are skipped and listed in ``problems``; a missing
    ``root`` is a problem too, not an error, so the demo still starts with the base.
    """
    root = Path(root)
    found = Found()
    if not root.is_dir():
        found.problems.append(f"{root} does not exist or is not a directory")
        return found
    configs = []
    # os.walk, not rglob: a symlinked run directory is followed (the depth limit ends any loop).
    for current, dirs, files in os.walk(root, followlinks=True):
        relative = Path(current).relative_to(root)
        # A run's checkpoints (OUTPUT_DIR/checkpoints/checkpoint-N/adapter) and
        # half-written temporaries (.tmp-*, .adapter-*) are not adapters to offer.
        deep = len(relative.parts) >= SEARCH_DEPTH
        dirs[:] = [] if deep else [d for d in dirs if d != CHECKPOINTS and not d.startswith(".")]
        if CONFIG_FILE in files:
            configs.append(Path(current) / CONFIG_FILE)
    configs.sort()
    for config in configs:
        directory = config.parent
        relative = directory.relative_to(root)
        if relative.name == "adapter" and len(relative.parts) > 1:
            relative = relative.parent
        name = relative.as_posix() if relative.parts else directory.name
        try:
            found.add(name, open_adapter(directory))
        except (AdapterError, OSError) as exc:
            found.problems.append(f"unusable: {name}: {exc}")
    return found


def collect_adapters(adapters_dir: str, explicit: dict[str, Path]) -> Found:
    """The adapters found under ``adapters_dir`` and those given by name (the server's ``--adapter NAME=DIR``)."""
    found = find_adapters(adapters_dir)
    if explicit and adapters_dir == "runs" and not Path("runs").is_dir():
        found.problems.clear()  # only --adapter was meant: the missing default directory is no problem
    for name, directory in explicit.items():
        if name in found.adapters:
            raise ConfigError(
                f"--adapter {name}: an adapter named {name!r} was also found under {adapters_dir}; choose another name"
            )
        found.add(name, open_adapter(directory))
    return found


@dataclass(frozen=True)
class BaseChoice:
    """The base to load for some adapters, and how (:func:`base_for`)."""

    name: str
    revision: str | None
    settings: LoadSettings

    @property
    def key(self) -> tuple[str, str | None, LoadSettings]:
        """What identifies a loaded base: adapters with the same key share one."""
        return self.name, self.revision, self.settings


def base_for(
    adapters: Sequence[Adapter],
    base: str | None = None,
    *,
    quantization: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    purpose: str | None = None,
) -> BaseChoice:
    """The base that ``adapters`` need and how to load it: the one decision every loader asks.

    One adapter (``purpose`` not given): ``base`` if given, else the base its
    ``multimodal_lora.json`` records (with its revision), else PEFT's config's.
    A set of adapters served together (``purpose`` names who: ``the demo``,
    ``the server``): ``base`` if given, else the base of the first adapter with a
    record, else ``tiny`` with the defaults. No adapters: ``base``, else ``tiny``.

    How it loads (quantization, dtype, device) is the deciding adapter's record
    fitted to this machine, each given override winning (see
    :func:`multimodal_lora.model.loading.resolve`, which writes the one log line).

    Raises:
        AdapterError: nothing says which base a foreign adapter belongs to and ``base`` was not given.
    """
    overrides = dict(quantization=quantization, dtype=dtype, device=device)
    name, revision, deciding = _decide(adapters, base, purpose)
    recorded = deciding.meta.load if deciding is not None and deciding.meta is not None else None
    if purpose is None and adapters:
        settings = resolve(recorded, **overrides, subject=f"base {name} for adapter {deciding.directory}")
        return BaseChoice(name, revision, settings)
    subject = f"base {name} for {purpose}" if purpose else f"base {name}"
    settings = resolve(recorded, **overrides, subject=subject, bare=deciding is None)
    return BaseChoice(name, revision, settings)


def base_name_for(adapters: Sequence[Adapter], base: str | None = None, *, purpose: str | None = None) -> tuple[str, str | None]:
    """``(base, revision)`` that :func:`base_for` decides, without deciding how it loads (and without its
    log line): for a caller that refuses some bases before it says anything else."""
    name, revision, _ = _decide(adapters, base, purpose)
    return name, revision


def _decide(adapters: Sequence[Adapter], base: str | None, purpose: str | None) -> tuple[str, str | None, Adapter | None]:
    """The base's name and revision, and the adapter whose record decides how it loads (``None``: none)."""
    if purpose is None and adapters:
        adapter = adapters[0]
        return (*base_of(adapter.directory, adapter.meta, base, adapter.config), adapter)
    first = next((a for a in adapters if a.meta is not None), None)
    return base or (first.meta.base.name if first is not None else None) or DEFAULT_BASE, None, first
