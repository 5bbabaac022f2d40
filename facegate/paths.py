"""Confinement of caller-given paths to the configured gallery roots (symlinks and `..` resolved first)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


class PathRefused(PermissionError):
    """A caller named a path outside every gallery root, or one that does not exist."""


def confine(path: str | os.PathLike[str], roots: Sequence[Path]) -> Path:
    """The real path of `path`, if it lies inside one of `roots`; otherwise PathRefused naming it."""
    if not roots:
        raise PathRefused("no gallery roots are configured: set FACEGATE_GALLERY_ROOTS")
    raw = Path(path).expanduser()
    # strict resolution: follows every symlink and `..`, and refuses what does not exist.
    try:
        real = raw.resolve(strict=True)
    except FileNotFoundError:
        raise PathRefused(f"{raw}: no such file or directory") from None
    except (OSError, RuntimeError) as exc:  # symlink loops, permissions
        raise PathRefused(f"{raw}: cannot be resolved ({exc})") from None
    for root in roots:
        root_real = Path(root).expanduser().resolve()
        if real == root_real or real.is_relative_to(root_real):
            return real
    where = ", ".join(str(r) for r in roots)
    hint = f" (it resolves to {real})" if str(real) != str(raw.absolute()) else ""
    raise PathRefused(f"{raw} is outside the gallery roots{hint}; allowed roots: {where}")


def iter_image_files(directory: Path) -> Iterator[Path]:
    """Image files under `directory` by suffix, sorted, hidden files and folders skipped."""
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
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
