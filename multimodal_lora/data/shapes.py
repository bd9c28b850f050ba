"""The bundled data: coloured shapes with captions, and questions about them.

``path: shapes`` (captions) and ``path: shapes-vqa`` (question–answer pairs) in
a recipe's ``data`` section name these data sets. They are generated
deterministically on first use as Hugging Face ``imagefolder`` directories
(PNG files plus ``metadata.jsonl``, one folder per split) under the cache, and
then read by the same loader as any user's imagefolder.

Each image is one shape (circle, square, triangle, cross) in one of six
colours, at a random position and size on a white background; its caption is
"a red circle". The VQA set asks "What colour is the shape?" and "What shape
is it?" about the same kind of images.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from multimodal_lora.core.atomic import staging_dir

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
CANVAS = 64
# Bump when the drawing or the splits change so cached copies are rebuilt.
VERSION = 3

BUILTIN = {
    # name: (task, {split: number of images})
    "shapes": ("caption", {"train": 2000, "validation": 200}),
    "shapes-vqa": ("vqa", {"train": 2000, "validation": 200}),
}
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?"}


def draw_shape(colour: str, shape: str, rng: random.Random):
    """Draw one shape on a white canvas at a random position and size."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (CANVAS, CANVAS), "white")
    draw = ImageDraw.Draw(image)
    # Position and size vary, but the shape stays near the centre: the tiny
    # base's frozen random vision encoder is not translation invariant, so a
    # shape anywhere on the canvas would be a task for the vision side, which
    # LoRA in the language model cannot learn.
    size = rng.randint(CANVAS // 2, CANVAS * 4 // 5)
    jitter = CANVAS // 32
    x0 = (CANVAS - size) // 2 + rng.randint(-jitter, jitter)
    y0 = (CANVAS - size) // 2 + rng.randint(-jitter, jitter)
    x0 = min(max(x0, 1), CANVAS - size - 1)
    y0 = min(max(y0, 1), CANVAS - size - 1)
    x1, y1 = x0 + size, y0 + size
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + size / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        arm = size // 3
        draw.rectangle((x0 + arm, y0, x1 - arm, y1), fill=fill)
        draw.rectangle((x0, y0 + arm, x1, y1 - arm), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return image


def _rows(task: str, split: str, count: int, seed: int, directory: Path) -> list[dict]:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for index in range(count):
        colour = rng.choice(sorted(COLOURS))
        shape = rng.choice(SHAPES)
        file_name = f"{index:05d}.png"
        draw_shape(colour, shape, rng).save(directory / file_name, optimize=True)
        if task == "caption":
            rows.append({"file_name": file_name, "text": f"{article(colour)} {colour} {shape}"})
        else:
            kind = rng.choice(sorted(QUESTIONS))
            answer = colour if kind == "colour" else shape
            rows.append({"file_name": file_name, "question": QUESTIONS[kind], "answer": answer})
    return rows


def write_builtin(name: str, directory: Path, seed: int = 0) -> None:
    """Write the built-in data set ``name`` as an imagefolder into ``directory``."""
    task, splits = BUILTIN[name]
    for split, count in splits.items():
        split_dir = directory / split
        split_dir.mkdir(parents=True)
        rows = _rows(task, split, count, seed, split_dir)
        with open(split_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def ensure_builtin(name: str, cache_root: Path | None = None) -> Path:
    """Generate the built-in data set once and return its imagefolder directory."""
    from multimodal_lora.cache import cache_dir

    root = cache_root if cache_root is not None else cache_dir()
    target = root / "data" / f"{name}-v{VERSION}"
    if (target / "validation" / "metadata.jsonl").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target)
    try:
        write_builtin(name, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "validation" / "metadata.jsonl").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def article(word: str) -> str:
    """'a' or 'an', so that the captions read as English ("an orange cross")."""
    return "an" if word[0] in "aeiou" else "a"
