"""What a run reports as it goes: ``metrics.jsonl``, ``loss.png``, experiment trackers.

``OUTPUT_DIR/metrics.jsonl`` has one JSON object per line: a ``"split": "train"``
line every ``train.log_every`` steps (step, epoch, loss, lr, samples/s, peak
memory since the loop began) and a ``"split": "validation"`` line per evaluation (validation loss and
captioning metrics). ``loss.png`` plots both losses; it is redrawn after an
evaluation at most every ``train.plot_every_seconds`` (drawing one costs about
0.2 s) and always at the end of the run. The trackers of ``train.report_to``
(TensorBoard, W&B, MLflow; see :mod:`multimodal_lora.training.trackers`) get the same
scalars through ``accelerator.log``. Only the main process writes.

A resumed run first drops the lines logged after its checkpoint's step, so the
file reads as if the run had never stopped.
"""

from __future__ import annotations

import io
import json
import logging
import resource
import time
from pathlib import Path

import torch

from multimodal_lora.core.atomic import as_write_error, atomic_file, write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class RunLog:
    """Appends metric records to ``metrics.jsonl`` (and the trackers), and draws ``loss.png``.

    Args:
        output_dir: the run directory.
        enabled: ``False`` on every process but the main one.
        resume_step: drop records after this step (a resumed run); ``None`` starts a new file.
        accelerator: whose started trackers (``accelerator.log``) get every record too; ``None``: none.
    """

    def __init__(
        self,
        output_dir: Path,
        enabled: bool = True,
        resume_step: int | None = None,
        accelerator=None,
        plot_every_seconds: float = 0.0,
    ):
        self.path = Path(output_dir) / METRICS_FILE
        self.plot_path = Path(output_dir) / PLOT_FILE
        self.enabled = enabled
        self.accelerator = accelerator
        self.plot_every_seconds = plot_every_seconds
        self._plotted_at: float | None = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step is not None else []
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept), "the metrics log")

    def log(self, record: dict) -> None:
        """Append one record (must have ``step`` and ``split``)."""
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        try:
            with self.path.open("a") as f:
                f.write(line)
        except OSError as exc:
            # An append cannot be staged; a full disk still gets the one-line message. A torn
            # last line is what read_metrics already skips, and a resumed run rewrites the file.
            raise as_write_error(exc, "the metrics log", self.path, needed=len(line.encode())) or exc from None
        if self.accelerator is not None and self.accelerator.trackers:
            from multimodal_lora.training.trackers import tracker_scalars

            self.accelerator.log(tracker_scalars(record), step=record["step"])

    def plot(self, force: bool = True) -> Path | None:
        """Redraw ``loss.png`` from ``metrics.jsonl``.

        Args:
            force: ``False`` skips the redraw when the last one was less than
                ``plot_every_seconds`` ago (returns ``None`` then).
        """
        if not self.enabled:
            return None
        now = time.monotonic()
        if not force and self._plotted_at is not None and now - self._plotted_at < self.plot_every_seconds:
            return None
        self._plotted_at = now
        return plot_losses(read_metrics(self.path), self.plot_path)

    def close(self) -> None:
        """Finish the trackers' runs (W&B and MLflow mark them finished, TensorBoard flushes)."""
        # Not accelerator.end_training(): it also tears down the process group, which the other
        # processes still need for the final barrier.
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator = None


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a line cut short by a crash is ignored)."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(records: list[dict], path: Path) -> Path | None:
    """Training and validation loss against the optimizer step, written atomically as a PNG.

    Returns ``None`` (with a warning) where matplotlib is missing: a bare GPU image
    running from a checkout may lack it, and the run matters more than its picture.
    """
    try:
        # The object-oriented API, not pyplot: no global figure state to leak, and no backend
        # switched under a notebook that calls train(). It also imports in less time.
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("%s not drawn: matplotlib is not installed (pip install matplotlib)", path)
        return None

    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "validation" and r.get("val_loss") is not None]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")  # a Figure without pyplot renders PNG through Agg
    # Drawn in memory first, so a full disk is told the size it needs.
    with atomic_file(path, "the loss curve", needed=png.getbuffer().nbytes) as tmp:
        tmp.write_bytes(png.getvalue())
    return path


def reset_peak_memory(device: torch.device) -> None:
    """Start :func:`peak_memory_mb` afresh, so that it tells the training's peak and not the load's.

    On a CPU the load's peak is mostly the checkpoint's memory-mapped shards
    (file pages the kernel may drop at any time), which would hide what the
    loop itself holds. Linux resets a process's peak resident set through
    ``/proc/self/clear_refs``; elsewhere the peak stays the process's.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the process-wide peak it is
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on a CUDA device, else the process's peak resident memory (both since :func:`reset_peak_memory`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        # The kernel's high-water mark, which reset_peak_memory restarts. ru_maxrss also keeps
        # the resident size the process had before exec (its forking parent's), which no reset clears.
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    # ru_maxrss is in kilobytes on Linux (bytes on macOS, where there is no reset either way).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
