"""Confinement of caller-given paths to the configured gallery roots (symlinks and `..` resolved first)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# Image formats FaceGate does not read: listed anyway, so each becomes an item that says so instead of
# being skipped in silence. The worker names the format in the item's reason.
UNREAD_IMAGE_SUFFIXES: dict[str, str] = {
    ".gif": "GIF", ".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".jxl": "JPEG XL", ".jp2": "JPEG 2000",
    ".svg": "SVG (a vector drawing)", ".pdf": "PDF", ".ico": "ICO", ".dng": "DNG (camera raw)",
    ".cr2": "CR2 (camera raw)", ".nef": "NEF (camera raw)", ".arw": "ARW (camera raw)",
}


class PathRefused(PermissionError):
    """A caller named a path outside every gallery root, or one that does not exist."""


def _inside(real: Path, roots: Sequence[Path]) -> bool:
    for root in roots:
        root_real = Path(root).expanduser().resolve()
        if real == root_real or real.is_relative_to(root_real):
            return True
    return False


def confine(path: str | os.PathLike[str], roots: Sequence[Path]) -> Path:
    """The real path of `path`, if it lies inside one of `roots`; otherwise PathRefused naming it.

    Outside the roots, the answer is the same whether the path exists or not, and it never says where
    a link points: a caller learns nothing of what lies beyond what it may read.
    """
    if not roots:
        raise PathRefused("no gallery roots are configured: set FACEGATE_GALLERY_ROOTS")
    text = os.fspath(path)
    if "\x00" in text:
        raise PathRefused(f"{text!r}: a path cannot contain a NUL byte")
    raw = Path(text).expanduser()
    where = ", ".join(str(r) for r in roots)
    outside = PathRefused(f"{raw} is outside the gallery roots this organisation may read ({where})")
    try:
        # Lenient first: follows every existing link and `..`, so where the path leads is judged
        # before anything about its existence is said.
        lenient = raw.resolve(strict=False)
    except (OSError, RuntimeError, ValueError):
        raise outside from None
    if not _inside(lenient, roots):
        raise outside
    try:
        real = raw.resolve(strict=True)
    except FileNotFoundError:
        raise PathRefused(f"{raw}: no such file or directory") from None
    except (OSError, RuntimeError, ValueError):  # symlink loops, permissions
        raise PathRefused(f"{raw}: cannot be resolved") from None
    if not _inside(real, roots):
        raise outside
    return real


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as text that can be stored and shown. A file name that is not valid UTF-8 (Python holds its bytes
    as surrogate escapes, which no database or JSON encoder takes) gets its bad bytes as \\x escapes."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def is_text_path(path: str | os.PathLike[str]) -> bool:
    """Whether the path is valid UTF-8 text, so that it can be stored as it is."""
    return display_path(path) == os.fspath(path)


def iter_image_files(directory: Path) -> Iterator[Path]:
    """Image files under `directory` by suffix (the ones FaceGate reads and the ones it refuses by name),
    sorted, hidden files and folders skipped."""
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            suffix = Path(name).suffix.lower()
            if not name.startswith(".") and (suffix in IMAGE_SUFFIXES or suffix in UNREAD_IMAGE_SUFFIXES):
                yield Path(dirpath) / name


def confined_images(paths: Iterable[str | os.PathLike[str]], roots: Sequence[Path]) -> list[Path]:
    """Expand files and folders into confined image files; every file is checked, links included."""
    out: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        real = confine(given, roots)
        candidates = [real] if real.is_file() else list(iter_image_files(real)) if real.is_dir() else []
        if not candidates and not real.is_dir():
            raise PathRefused(f"{given}: not a regular file or directory")
        for candidate in candidates:
            confined = confine(candidate, roots)
            if confined not in seen:
                seen.add(confined)
                out.append(confined)
    return out
