"""Image files as they come in the wild, written by the tests (no downloads).

Each writer returns the path it wrote; the colours are chosen so that a wrong
conversion shows in the pixel values, not only in the shape.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
SIZE = (24, 16)


def rgb_png(path: Path, colour=RED) -> Path:
    Image.new("RGB", SIZE, colour).save(path)
    return path


def cmyk_jpeg(path: Path) -> Path:
    """Pure cyan in CMYK: (0, 255, 255) in RGB."""
    Image.new("CMYK", SIZE, (255, 0, 0, 0)).save(path, format="JPEG", quality=95)
    return path


def palette_png_with_transparency(path: Path) -> Path:
    """Left half palette index 0 (red, fully transparent), right half index 1 (blue, opaque)."""
    image = Image.new("P", SIZE, 0)
    image.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    image.paste(1, (SIZE[0] // 2, 0, SIZE[0], SIZE[1]))
    image.save(path, transparency=0)
    return path


def grey16_png(path: Path, value: int = 40000) -> Path:
    """A 16-bit greyscale PNG holding ``value`` everywhere (40000 of 65535 is mid-grey, 156 of 255)."""
    import numpy as np

    Image.fromarray(np.full((SIZE[1], SIZE[0]), value, dtype=np.uint16)).save(path)
    return path


def exif_rotated_jpeg(path: Path) -> Path:
    """Stored 24×16, left half red, right half blue, with EXIF orientation 6 (display rotated 90° clockwise):
    shown 16×24 with red on top."""
    image = Image.new("RGB", SIZE, BLUE)
    image.paste(RED, (0, 0, SIZE[0] // 2, SIZE[1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", quality=95, exif=exif)
    return path


def truncated_jpeg(path: Path) -> Path:
    """A real JPEG with its second half cut off."""
    rng = random.Random(0)
    image = Image.new("RGB", (64, 64))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(64 * 64)])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def text_as_jpeg(path: Path) -> Path:
    path.write_text("this is a text file, not an image\n")
    return path


def animated_gif(path: Path) -> Path:
    """Two frames: red, then blue."""
    frames = [Image.new("RGB", SIZE, RED), Image.new("RGB", SIZE, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path
