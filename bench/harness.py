"""What every bench script shares: timing, the machine's description, tables, JSON results.

Bench scripts are plain Python run from the repository root
(``python bench/NAME.py``); each prints a small table and writes
``bench/results/NAME.json`` (atomically: a temporary file, then a rename).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# `python bench/NAME.py` puts bench/ first on sys.path, not the repository: make the package
# importable from a plain checkout (the GPU machine gets a copy, not an install).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "results"


def quiet() -> None:
    """Offline, and without the progress bars and warnings of the libraries underneath."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.disable(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads for torch.

    The tiny model's matrices are too small to gain from more than one, and on
    a machine shared with other work, threads that wait for a descheduled
    sibling make timings (wall and CPU alike) erratic.
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # The machine may be shared: the 1, 5 and 15-minute load when the figures were written.
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    # A figure that drifts with nothing in the repository changed (tiny.yaml's exact match: 180/200 on
    # 2026-12-04, 172 on 2026-12-07 with the same code) can only be traced with the rest of the stack.
    info["cpu_model"] = _cpu_model()
    info["packages"] = _versions(("peft", "accelerate", "datasets", "tokenizers", "safetensors", "numpy", "pillow"))
    return info


def _cpu_model() -> str | None:
    """The CPU's model name (Linux), since kernels that round differently are chosen per CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def _versions(names: tuple[str, ...]) -> dict[str, str | None]:
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Seconds ``fn`` took (after a CUDA sync, when there is a GPU), and its result."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def median(values) -> float:
    return float(statistics.median(values))


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain-text table: the first column left-aligned, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    fmt = lambda row: "  ".join(  # noqa: E731
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(row, widths))
    )
    lines = [title] if title else []
    lines += [fmt([str(h) for h in headers]), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def write_result(name: str, data: dict, directory: Path | None = None) -> Path:
    """Write ``data`` (plus the machine and the command) to ``bench/results/NAME.json``."""
    directory = Path(directory) if directory is not None else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    payload = {"bench": name, "command": " ".join(["python", *sys.argv]), "date": date, "machine": machine(), **data}
    path = directory / f"{name}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".json", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
