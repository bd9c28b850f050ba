"""Images as they come in the wild become the RGB a viewer would show: checked on pixel values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from multimodal_lora.core.errors import ImageError
from multimodal_lora.data.images import load_image, to_rgb

from . import imagefiles

WHITE = (255, 255, 255)


def pixel(image, x, y):
    assert image.mode == "RGB"
    return image.getpixel((x, y))


def close(a, b, tolerance=3):
    return all(abs(p - q) <= tolerance for p, q in zip(a, b))


def test_rgb_png_is_unchanged(tmp_path):
    image = load_image(imagefiles.rgb_png(tmp_path / "red.png"))
    assert pixel(image, 0, 0) == imagefiles.RED
    assert image.size == imagefiles.SIZE


def test_rgba_composites_on_white_by_alpha():
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128)])
    rgb = to_rgb(image)
    assert pixel(rgb, 0, 0) == WHITE  # fully transparent red is white, not red
    assert pixel(rgb, 1, 0) == (255, 0, 0)
    assert close(pixel(rgb, 2, 0), (255, 127, 127), tolerance=1)  # half red over white


def test_la_composites_on_white():
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 0), (100, 255)])
    rgb = to_rgb(image)
    assert pixel(rgb, 0, 0) == WHITE
    assert pixel(rgb, 1, 0) == (100, 100, 100)


def test_palette_png_with_transparency_composites_on_white(tmp_path):
    path = imagefiles.palette_png_with_transparency(tmp_path / "palette.png")
    assert Image.open(path).convert("RGB").getpixel((0, 0)) == imagefiles.RED  # the naive conversion
    image = load_image(path)
    assert pixel(image, 0, 0) == WHITE  # transparent palette entry
    assert pixel(image, imagefiles.SIZE[0] - 1, 0) == imagefiles.BLUE  # opaque entry keeps its colour


def test_greyscale_and_one_bit():
    grey = Image.new("L", (1, 1), 77)
    assert pixel(to_rgb(grey), 0, 0) == (77, 77, 77)
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    rgb = to_rgb(bits)
    assert pixel(rgb, 0, 0) == (0, 0, 0)
    assert pixel(rgb, 1, 0) == WHITE


@pytest.mark.parametrize("value, expected", [(0, 0), (40000, 156), (65535, 255), (257, 1)])
def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path, value, expected):
    path = imagefiles.grey16_png(tmp_path / "grey16.png", value)
    assert Image.open(path).mode.startswith("I;16")
    image = load_image(path)
    assert pixel(image, 0, 0) == (expected,) * 3  # round(value × 255 / 65535)


def test_blip2_processor_alone_turns_16bit_mid_grey_white(tmp_path, tiny_base):
    """Why load_image exists: the processor takes the 16-bit file without complaint and gets it wrong."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_base).image_processor
    path = imagefiles.grey16_png(tmp_path / "grey16.png", 40000)
    naive = processor(Image.open(path), return_tensors="pt").pixel_values
    white = processor(Image.new("RGB", imagefiles.SIZE, WHITE), return_tensors="pt").pixel_values
    ours = processor(load_image(path), return_tensors="pt").pixel_values
    assert np.allclose(naive.numpy(), white.numpy(), atol=1e-3)
    assert not np.allclose(ours.numpy(), white.numpy(), atol=0.1)


def test_mode_i_and_float_images():
    sixteen = Image.fromarray(np.full((1, 1), 40000, dtype=np.int32))  # mode I, values of a 16-bit file
    assert sixteen.mode == "I"
    assert pixel(to_rgb(sixteen), 0, 0) == (156, 156, 156)
    eight = Image.fromarray(np.full((1, 1), 77, dtype=np.int32))
    assert pixel(to_rgb(eight), 0, 0) == (77, 77, 77)
    unit = Image.fromarray(np.full((1, 1), 0.5, dtype=np.float32))
    assert pixel(to_rgb(unit), 0, 0) == (128, 128, 128)


def test_cmyk_jpeg_becomes_its_rgb_colour(tmp_path):
    path = imagefiles.cmyk_jpeg(tmp_path / "cmyk.jpg")
    assert Image.open(path).mode == "CMYK"
    assert close(pixel(load_image(path), 5, 5), (0, 255, 255))


def test_exif_orientation_is_applied(tmp_path):
    path = imagefiles.exif_rotated_jpeg(tmp_path / "rotated.jpg")
    image = load_image(path)
    assert image.size == (imagefiles.SIZE[1], imagefiles.SIZE[0])  # 16 wide, 24 high
    assert close(pixel(image, 8, 2), imagefiles.RED)  # stored left half, shown on top
    assert close(pixel(image, 8, 21), imagefiles.BLUE)


def test_animated_image_uses_its_first_frame(tmp_path):
    path = imagefiles.animated_gif(tmp_path / "anim.gif")
    assert getattr(Image.open(path), "n_frames", 1) == 2
    assert pixel(load_image(path), 0, 0) == imagefiles.RED


def test_bytes_load_like_files(tmp_path):
    path = imagefiles.palette_png_with_transparency(tmp_path / "palette.png")
    assert list(load_image(path.read_bytes()).getdata()) == list(load_image(path).getdata())


@pytest.mark.parametrize(
    "writer, message",
    [
        (imagefiles.truncated_jpeg, "corrupt or truncated"),
        (imagefiles.zero_byte, r"empty file \(0 bytes\)"),
        (imagefiles.text_as_jpeg, "not an image"),
    ],
)
def test_unreadable_files_raise_image_error_naming_the_file(tmp_path, writer, message):
    path = writer(tmp_path / "bad.jpg")
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nowhere.jpg")


def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch):
    # DecompressionBombError is not an OSError: a handler for OSError alone would let it escape.
    assert not issubclass(Image.DecompressionBombError, OSError)
    path = imagefiles.rgb_png(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 24 × 16 = 384 > 2 × 100 pixels: a "bomb"
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path)


def test_pixel_and_format_limits_are_checked_from_the_header(tmp_path):
    """The demo and the server open images the same way: limits from the header, before decoding."""
    from multimodal_lora.data.images import FormatRefused, TooManyPixels

    path = imagefiles.rgb_png(tmp_path / "red.png")  # 24 × 16
    assert load_image(path, max_pixels=24 * 16, formats={"PNG"}).size == imagefiles.SIZE
    with pytest.raises(TooManyPixels, match="24×16 = 384 pixels is more than 383") as info:
        load_image(path, max_pixels=383)
    assert info.value.size == (24, 16)
    with pytest.raises(FormatRefused, match="PNG images are not accepted") as refused:
        load_image(path.read_bytes(), name="upload", formats={"JPEG"})
    assert refused.value.format == "PNG" and str(refused.value).startswith("upload:")
    with pytest.raises(FormatRefused) as unknown:
        load_image(b"not an image", formats={"PNG"})
    assert unknown.value.format is None
