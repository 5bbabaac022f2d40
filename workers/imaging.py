"""Safe image decoding: size limits before pixels are decompressed, EXIF orientation, RGB."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facegate.paths import UNREAD_IMAGE_SUFFIXES, is_text_path

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})
READ_FORMATS = "JPEG, PNG, WebP, BMP and TIFF"  # SUPPORTED_FORMATS as a person names them


class ImageRejected(ValueError):
    """This one image cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class DecodedImage:
    path: str
    sha256: str
    image: Image.Image  # RGB, upright


def read_image_bytes(path: str | Path, max_bytes: int) -> bytes:
    if not is_text_path(path):
        # Its name could be stored neither in the vector store nor in the job's records as it is.
        raise ImageRejected("its file name is not valid UTF-8 (shown here with \\x escapes); FaceGate keeps file "
                            "names as text: rename the file")
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise ImageRejected("file not found") from None
    except OSError as exc:
        raise ImageRejected(f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise ImageRejected("empty file")
    if size > max_bytes:
        raise ImageRejected(f"file is {size} bytes, over the limit of {max_bytes} bytes")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ImageRejected(f"cannot read file: {exc.strerror or exc}") from None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode to an upright RGB image, or raise ImageRejected with a reason a person can act on."""
    if not data:
        raise ImageRejected("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in SUPPORTED_FORMATS:
                raise ImageRejected(
                    f"unsupported image format {image.format}; supported: {READ_FORMATS}"
                )
            width, height = image.size
            # Checked from the header, before any pixel is decompressed.
            if width * height > max_pixels:
                raise ImageRejected(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                )
            image.load()
            return _to_eight_bits(ImageOps.exif_transpose(image)).convert("RGB")
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image, or an image format that cannot be read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"corrupt image: {exc}") from None


def _to_eight_bits(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer greyscale scaled to 8 bits: Pillow's convert("RGB") clips them to white,
    which found no face in a perfectly good 16-bit scan."""
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    peak = 255.0 if values.max(initial=0) <= 255 else 65535.0
    return Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")


def load_image(path: str | Path, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    unread = UNREAD_IMAGE_SUFFIXES.get(Path(path).suffix.lower())
    if unread:
        raise ImageRejected(f"{unread} files are not read by FaceGate (it reads {READ_FORMATS}): "
                            "convert this one to JPEG or PNG to index or search it")
    data = read_image_bytes(path, max_bytes)
    return DecodedImage(path=str(path), sha256=hashlib.sha256(data).hexdigest(),
                        image=decode_image(data, max_pixels=max_pixels))
