"""Shared by the benchmarks: fixture location, the generated gallery, tables, machine description."""

from __future__ import annotations

import io
import os
import platform
import random
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
# The real photos live beside the repository and are never copied into it (fixtures README).
FIXTURES = Path(os.environ.get("FACEGATE_TEST_FIXTURES", ROOT.parent / "shared" / "fixtures" / "faces")).resolve()

UNTRAINED_BANNER = ("*** UNTRAINED WEIGHTS (weights=untrained, asked for explicitly): speed figures only; "
                    "these embeddings say nothing about identity ***")


def fixture_sources() -> dict[str, list[Path]]:
    photos = sorted((FIXTURES / "photos").glob("*.jpg"))
    aligned = sorted((FIXTURES / "aligned").glob("*.png"))
    if not photos:
        sys.exit(f"face fixtures not found in {FIXTURES}: set FACEGATE_TEST_FIXTURES")
    return {"photo": photos, "group": [FIXTURES / "multiface.jpg"], "aligned": aligned,
            "noise": [FIXTURES / "noise.jpg"]}


# Share of each kind of source image in a generated gallery.
MIX = (("photo", 0.45), ("group", 0.35), ("aligned", 0.10), ("noise", 0.10))


def _one_image(n: int, seed: int, min_side: int, max_side: int, sources: dict[str, list[Path]], out: Path) -> Path:
    from PIL import Image, ImageEnhance, ImageOps

    rng = random.Random(seed * 1_000_003 + n)
    kind = rng.choices([k for k, _ in MIX], weights=[w for _, w in MIX])[0]
    src = rng.choice(sources[kind])
    image = Image.open(src).convert("RGB")
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if kind == "aligned":
        # A face crop: scaled up a little, never cropped further.
        side = rng.randint(160, 480)
        image = image.resize((side, side), Image.BICUBIC)
    else:
        # Crop 80-100% of each side, then scale the longest side to min_side..max_side (uniform).
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = image.crop((x0, y0, x0 + cw, y0 + ch))
        target = rng.randint(min_side, max_side)
        scale = target / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC if scale > 1 else Image.LANCZOS)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    path = out / f"{n:05d}_{kind}_{src.stem}.jpg"
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=rng.randint(60, 95))  # JPEG re-encoding
    path.write_bytes(buf.getvalue())
    return path


def make_gallery(out: Path, count: int, *, seed: int = 0, min_side: int = 320, max_side: int = 2048,
                 threads: int = 2) -> list[Path]:
    """A deterministic gallery of `count` JPEGs of mixed sizes made from the fixtures, written into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    sources = fixture_sources()
    with ThreadPoolExecutor(threads) as pool:
        paths = list(pool.map(lambda n: _one_image(n, seed, min_side, max_side, sources, out), range(count)))
    return paths


class TempGallery:
    """A generated gallery in a temporary folder (never in the repository), removed afterwards."""

    def __init__(self, count: int, *, seed: int = 0, min_side: int = 320, max_side: int = 2048,
                 keep: str | None = None) -> None:
        self.count, self.seed, self.min_side, self.max_side = count, seed, min_side, max_side
        self.keep = keep
        self.dir: Path | None = None
        self.paths: list[Path] = []

    def __enter__(self) -> "TempGallery":
        if self.keep:
            self.dir = Path(self.keep)
            existing = sorted(self.dir.glob("*.jpg")) if self.dir.exists() else []
            if len(existing) == self.count:
                self.paths = existing
                return self
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="facegate-bench-"))
        self.paths = make_gallery(self.dir / "" if self.keep else self.dir / "gallery", self.count, seed=self.seed,
                                  min_side=self.min_side, max_side=self.max_side)
        return self

    def __exit__(self, *_exc) -> None:
        if not self.keep and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def describe(self) -> str:
        from PIL import Image

        sides = [max(Image.open(p).size) for p in self.paths]
        mb = sum(p.stat().st_size for p in self.paths) / 1e6
        return (f"{len(self.paths)} JPEGs generated from {FIXTURES} (seed {self.seed}): longest side "
                f"{min(sides)}-{max(sides)} px, median {sorted(sides)[len(sides) // 2]} px, {mb:.0f} MB")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; Python {platform.python_version()}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def command_line() -> str:
    return "python -m " + (sys.modules["__main__"].__spec__.name if sys.modules["__main__"].__spec__ else
                           sys.argv[0]) + " " + " ".join(sys.argv[1:])
