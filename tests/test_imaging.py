"""Decoding: every supported format, EXIF orientation, and each kind of bad file rejected with a reason."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.conftest import PHOTOS
from workers.imaging import ImageRejected, decode_image, load_image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_supported_formats_decode_to_rgb(fmt):
    buffer = io.BytesIO()
    Image.new("L", (40, 30), 128).save(buffer, fmt)
    image = decode_image(buffer.getvalue(), max_pixels=10**6)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_exif_orientation_is_applied():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.new("RGB", (40, 30), "red").save(buffer, "JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), max_pixels=10**6).size == (30, 40)


def test_truncated_jpeg_is_rejected_as_corrupt():
    data = PHOTOS[0].read_bytes()
    with pytest.raises(ImageRejected, match="corrupt"):
        decode_image(data[: len(data) // 3], max_pixels=10**8)


def test_text_file_is_rejected():
    with pytest.raises(ImageRejected, match="not an image"):
        decode_image(b"this is not a photo\n" * 10, max_pixels=10**6)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageRejected, match="empty file"):
        load_image(path, max_bytes=10**6, max_pixels=10**6)


def test_pixel_limit_is_checked_before_decompression():
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, "PNG")  # compresses to a few KB
    with pytest.raises(ImageRejected, match="3000x3000 = 9000000 pixels, over the limit of 1000000"):
        decode_image(buffer.getvalue(), max_pixels=1_000_000)


def test_byte_limit(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(PHOTOS[0].read_bytes())
    with pytest.raises(ImageRejected, match="over the limit of 1000 bytes"):
        load_image(path, max_bytes=1000, max_pixels=10**8)


def test_unsupported_format_is_named():
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, "GIF")
    with pytest.raises(ImageRejected, match="unsupported image format GIF"):
        decode_image(buffer.getvalue(), max_pixels=10**6)


def test_load_image_hashes_the_file_bytes():
    import hashlib

    decoded = load_image(PHOTOS[0], max_bytes=10**8, max_pixels=10**8)
    assert decoded.sha256 == hashlib.sha256(PHOTOS[0].read_bytes()).hexdigest()
