"""Reading images as they come in the wild, into RGB that means what the file meant.

Pillow and the BLIP-2 processor accept almost any mode without complaint and
quietly get some wrong: a fully transparent red pixel stays red, a 16-bit
value of 40000 becomes pure white. :func:`load_image` converts every mode
correctly (transparency composited on white, 16-bit scaled to 8-bit), applies
EXIF orientation, takes the first frame of an animation, and turns every way a
file can be unreadable into an :class:`~multimodal_lora.core.errors.ImageError`
naming the file. Given ``max_pixels`` or ``formats`` (the demo, the server), it
checks them from the header before decoding: a few hundred bytes can claim gigapixels.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageOps

from multimodal_lora.core.errors import ImageError


class StoredImage:
    """An image in one row of an Arrow data set (hub or ``save_to_disk``), read only when used.

    The data set is memory-mapped, so holding ten thousand of these costs no
    image bytes; each is read when decoded. Pickles cheaply (``datasets``
    pickles a memory-mapped table as its file paths), so DataLoader workers
    can take it.
    """

    def __init__(self, dataset, column: str, index: int, root: str = "."):
        self.dataset = dataset
        """A ``datasets.Dataset`` whose image column is cast to ``Image(decode=False)``."""
        self.column = column
        self.index = index
        self.root = root
        """Directory that a stored relative path is relative to."""

    def read(self) -> str | bytes:
        """The encoded bytes, or the path of the file when the row stores only a path ("" for none)."""
        value = self.dataset[self.index][self.column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if value is None:
            return ""
        if isinstance(value, str) and value:
            return os.path.join(self.root, value)
        return value

    def __repr__(self) -> str:
        return f"StoredImage(row {self.index}, column {self.column!r})"


ImageSource = str | os.PathLike | bytes | Image.Image | StoredImage

BACKGROUND = (255, 255, 255)

MAX_PIXELS = 40_000_000
"""The most pixels (width × height) the demo and the server take by default: more than any phone
photo, while a small upload can unpack to gigabytes (a decompression bomb)."""


class TooManyPixels(ImageError):
    """The image has more pixels than allowed (or Pillow refused it at once as a decompression bomb)."""

    def __init__(self, message: str, size: tuple[int, int] | None = None, detail: str = ""):
        super().__init__(message)
        self.size = size
        """``(width, height)`` from the header; ``None`` when Pillow refused to open it at all."""
        self.detail = detail


class FormatRefused(ImageError):
    """The data is not an image in one of the formats allowed."""

    def __init__(self, message: str, format: str | None = None):
        super().__init__(message)
        self.format = format
        """The format the header names; ``None`` when it is no image Pillow identifies."""


def load_image(
    source: ImageSource, name: str | None = None, *, max_pixels: int | None = None, formats: set[str] | None = None
) -> Image.Image:
    """Open an image and return it as an RGB ``PIL.Image``.

    Args:
        source: a path, the file's bytes, or an already opened image.
        name: how to call the image in error messages (defaults to the path).
        max_pixels: refuse, from the header and before decoding, more pixels than this.
        formats: accept only these Pillow formats (``{"PNG", "JPEG", "WEBP"}``), checked from the header.

    Raises:
        ImageError: the file is missing, empty, not an image, truncated,
            corrupt, or a decompression bomb; the message names it.
            :class:`TooManyPixels` and :class:`FormatRefused` for the limits given.
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, StoredImage):
        source = source.read()
        if isinstance(source, str) and not source:
            raise ImageError(f"{label}: no image in this row")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{label}: file not found")
        if path.is_dir():
            raise ImageError(f"{label}: is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(f"{label}: empty file (0 bytes)")
    if max_pixels is not None or formats is not None:
        _check_header(source, label, max_pixels, formats)
    if isinstance(source, bytes) and not source:
        raise ImageError(f"{label}: empty file (0 bytes)")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp) as image:
            image.seek(0)  # first frame of an animation
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as exc:
        # Not an OSError: Pillow raises it for images over twice MAX_IMAGE_PIXELS.
        raise ImageError(f"{label}: refused as a decompression bomb ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{label}: not an image Pillow can read (wrong extension, or not an image at all)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from None


EXIF_ORIENTATION = 0x0112
ROTATED = (5, 6, 7, 8)
"""EXIF orientations that turn the image a quarter turn (:func:`to_rgb` swaps its sides)."""


def image_size(source: ImageSource) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`load_image` returns it (EXIF rotation applied), from its
    header alone (nothing is decoded). The image must be readable (:func:`load_image` said so)."""
    if isinstance(source, StoredImage):
        source = source.read()
    if isinstance(source, Image.Image):
        return _upright_size(source)
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return _upright_size(image)


def _upright_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if image.getexif().get(EXIF_ORIENTATION) in ROTATED else (width, height)


def _check_header(source, label: str, max_pixels: int | None, formats: set[str] | None) -> None:
    """The format and pixel count from the header alone (nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as probe:
            width, height, fmt = probe.width, probe.height, probe.format
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused at open
        raise TooManyPixels(f"{label}: refused as a decompression bomb ({exc})", detail=str(exc)) from None
    except Exception:
        if formats is not None:
            raise FormatRefused(f"{label}: not an image in an accepted format ({', '.join(sorted(formats))})") from None
        return  # decoding below names every way the file can be unreadable
    if formats is not None and fmt not in formats:
        raise FormatRefused(f"{label}: {fmt} images are not accepted ({', '.join(sorted(formats))})", format=fmt)
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(
            f"{label}: {width}×{height} = {width * height:,} pixels is more than {max_pixels:,}", size=(width, height)
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way a viewer would show it."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit (or 32-bit) grey: scale to 8 bits rather than clip to white.
        return _scale_to_8bit(image).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, BACKGROUND)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    if mode == "RGB":
        return image.copy() if image.readonly else image
    return image.convert("RGB")


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Grey levels of a 16-bit (or 32-bit integer, or float) image mapped onto 0..255."""
    import numpy as np

    array = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        high = 65535.0  # a 16-bit file's full scale, whatever values this image happens to use
    elif image.mode == "F":
        high = 1.0 if array.max(initial=0.0) <= 1.0 else float(array.max())  # floats are usually 0..1
    else:
        # Mode "I" has no fixed range: 8-bit values stay, 16-bit ones use the 16-bit scale.
        peak = float(array.max(initial=0.0))
        high = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    return Image.fromarray(np.clip(np.round(array * (255 / high)), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
