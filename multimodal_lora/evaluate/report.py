"""The evaluation report: ``report.md`` and ``report.html`` (a jinja2 template), with thumbnails.

The page puts each metric beside one line on what it measures and its scale,
then, for a sample of images, the thumbnail, the question (VQA), the
references and the base's and the adapter's outputs side by side. The metrics
themselves are computed in :mod:`multimodal_lora.core.metrics`; this module only
renders them.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from multimodal_lora.core.atomic import atomic_dir
from multimodal_lora.core.metrics import LABELS, METRICS, normalize

TEMPLATE = "report.html.j2"

MEANINGS = {
    "val_loss": "Mean cross-entropy per target token on the validation references. Lower is better; 0 would be perfect.",
    "bleu4": (
        "Geometric mean of 1- to 4-gram precision against the references, with a brevity penalty; 0–1, higher is better. "
        "A caption of three words has no 4-grams, so for short captions BLEU-4 stays near 0 even when they are exactly "
        "right: read exact match and CIDEr-D there."
    ),
    "cider_d": (
        "Agreement of 1- to 4-grams with the references, weighted towards words specific to this image (TF-IDF); "
        "0–10, higher is better (strong COCO captioners score about 1.1–1.4)."
    ),
    "rouge_l": "Longest common subsequence with the best-matching reference, as an F-score; 0–1, higher is better.",
    "meteor": "Unigram matches including stems and synonyms, penalising scattered matches; 0–1, higher is better.",
    "exact_match": "Share of images whose output equals one of their references after lower-casing and removing punctuation.",
}
"""One line per metric: what it measures and its scale."""

_REPLACEMENT_RUN = re.compile("\ufffd+")


def legible(text: str) -> str:
    """Model output made readable: runs of U+FFFD (byte sequences that are not UTF-8 text, common in
    an untrained model's output) become one "·", and control characters are dropped."""
    text = _REPLACEMENT_RUN.sub("·", text)
    return "".join(ch for ch in text if ch.isprintable() or ch == " ")


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if key == "exact_match":
        return f"{value:.1%}"
    return f"{value:.4f}"


def _thumbnail(image_source) -> bytes:
    from multimodal_lora.data.images import load_image

    image = load_image(image_source)
    image.thumbnail((128, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_html(
    title: str, subtitle: str, table: dict[str, dict], samples: list[dict], notes: list[str], thumbnails: list[bytes]
) -> str:
    """The HTML page (self-contained: thumbnails are inlined)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("multimodal_lora", "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    columns = list(table)
    rows = []
    for key in ["val_loss", *METRICS]:
        values = {c: table[c].get(key) for c in columns}
        known = [v for v in values.values() if v is not None]
        # Highlight the better column only where the shown figures differ (0.0000 against 0.0000 is a tie).
        shown = {_cell(key, v) for v in known}
        best = (min(known) if key == "val_loss" else max(known)) if len(known) > 1 and len(shown) > 1 else None
        label = "validation loss" if key == "val_loss" else LABELS[key]
        rows.append(
            {
                "label": label,
                "meaning": MEANINGS[key],
                "cells": [
                    {"text": _cell(key, values[c]), "best": best is not None and values[c] == best} for c in columns
                ],
            }
        )
    cards = []
    for sample, thumb in zip(samples, thumbnails):
        refs = {normalize(r) for r in sample["references"]}
        cards.append(
            {
                "image_id": sample["image_id"],
                "question": sample.get("question"),
                "references": sample["references"],
                "thumbnail": base64.b64encode(thumb).decode(),
                "outputs": {c: legible(sample[c]) for c in columns},
                "matches": {c: normalize(sample[c]) in refs for c in columns},
            }
        )
    noisy = any("\ufffd" in sample[c] for sample in samples for c in columns)
    return env.get_template(TEMPLATE).render(
        title=title, subtitle=subtitle, columns=columns, rows=rows, notes=notes, samples=cards, noisy=noisy
    )


def render_markdown(title: str, table: dict[str, dict], samples: list[dict], notes: list[str], names: list[str]) -> str:
    columns = list(table)
    labels = {"val_loss": "validation loss (lower is better)", **LABELS}
    md = [
        f"# {title}",
        "",
        "| metric | " + " | ".join(columns) + " | what it means |",
        "| --- |" + " --- |" * (len(columns) + 1),
    ]
    for key in ["val_loss", *METRICS]:
        md.append(
            f"| {labels[key]} | " + " | ".join(_cell(key, table[c].get(key)) for c in columns) + f" | {MEANINGS[key]} |"
        )
    md += ["", *[f"- {n}" for n in notes], "", "## Samples", ""]
    for sample, name in zip(samples, names):
        md += [f"### {sample['image_id']}", "", f"![{sample['image_id']}]({name})", ""]
        if sample.get("question"):
            md.append(f"- question: {sample['question']}")
        md += [f"- references: {' / '.join(sample['references'])}"]
        md += [f"- {c}: {legible(sample[c])}" for c in columns] + [""]
    return "\n".join(md)


def write_report(
    directory: Path, title: str, table: dict[str, dict], samples: list[dict], notes: list[str], subtitle: str = ""
) -> Path:
    """Write ``report.md``, ``report.html`` and ``thumbnails/`` into ``directory``, atomically.

    Args:
        table: column name (e.g. ``base``, ``adapter``) → metric key → value.
        samples: dicts with ``image_id``, ``image``, ``references``, optionally
            ``question``, and one output per column.
        notes: lines printed under the table (e.g. why METEOR is missing).
    """
    directory = Path(directory)
    thumbnails = [_thumbnail(sample["image"]) for sample in samples]
    with atomic_dir(directory, "the evaluation report") as tmp:
        (tmp / "thumbnails").mkdir()
        names = []
        for i, data in enumerate(thumbnails):
            name = f"thumbnails/{i:03d}.png"
            (tmp / name).write_bytes(data)
            names.append(name)
        (tmp / "report.md").write_text(render_markdown(title, table, samples, notes, names))
        (tmp / "report.html").write_text(render_html(title, subtitle, table, samples, notes, thumbnails))
    return directory
