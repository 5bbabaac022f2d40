"""Files: atomic writes (the calibration store, the evaluation reports) and content hashes (weights, gallery images)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder, so a reader never sees half a
    calibration or report (a crash leaves the old file, or none)."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks (hashlib.file_digest)."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
