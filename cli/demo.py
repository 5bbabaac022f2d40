"""Demo data: a gallery folder and probes made from its photos (flips, crops, re-encoding), never downloaded."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image, ImageOps

from facegate.paths import IMAGE_SUFFIXES, iter_image_files


def bundled_sample_photos() -> list[Path]:
    """Public-domain photos that ship inside installed packages (matplotlib's sample data)."""
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    return [p for p in (sample / "grace_hopper.jpg",) if p.exists()]


def _probe_variants(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    crop = image.crop((int(w * 0.04), int(h * 0.04), int(w * 0.96), int(h * 0.96)))
    return {"mirror": ImageOps.mirror(image), "crop": crop,
            "small": image.resize((max(1, w * 2 // 3), max(1, h * 2 // 3)), Image.Resampling.BILINEAR)}


def prepare_demo(demo_dir: Path, source: Path | None) -> tuple[Path, Path]:
    """Fill DEMO_DIR/gallery (or use SOURCE) and DEMO_DIR/probes; returns both folders."""
    gallery = demo_dir / "gallery"
    probes = demo_dir / "probes"
    shutil.rmtree(probes, ignore_errors=True)
    probes.mkdir(parents=True, exist_ok=True)
    if source is None:
        gallery.mkdir(parents=True, exist_ok=True)
        photos = bundled_sample_photos()
        if not photos:
            raise SystemExit("matplotlib's sample photos are missing; pass a folder: facegate demo DIR")
        for photo in photos:
            shutil.copy2(photo, gallery / photo.name)
        originals = sorted(iter_image_files(gallery))
    else:
        gallery = source.resolve()
        # Probes are cut only from files Pillow reads; the others still show as refused items of the index job.
        originals = [p for p in sorted(iter_image_files(gallery)) if p.suffix.lower() in IMAGE_SUFFIXES][:20]
    for original in originals:
        with Image.open(original) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
        for name, variant in _probe_variants(image).items():
            buffer = io.BytesIO()
            variant.save(buffer, "JPEG", quality=85)
            (probes / f"{original.stem}-{name}.jpg").write_bytes(buffer.getvalue())
    return gallery, probes


def fixture_identities() -> Path | None:
    """`../shared/fixtures` beside a checkout (two photos of one person, and other people), if present."""
    import os

    configured = os.environ.get("FACEGATE_DEMO_FIXTURES")
    root = Path(configured) if configured else Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
    if (root / "identities" / "barack_obama").is_dir() and (root / "faces" / "photos").is_dir():
        return root
    return None


def prepare_people_demo(demo_dir: Path, fixtures: Path) -> tuple[Path, Path]:
    """A gallery of several people with one photo of Obama, and probes: his *other* photo, and a person
    who is not in the gallery. Copied into the demo's data folder (never into a repository)."""
    gallery = demo_dir / "people"
    probes = demo_dir / "people-probes"
    for folder in (gallery, probes):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    obama = sorted((fixtures / "identities" / "barack_obama").glob("*.jpg"))
    others = [*(p for p in sorted((fixtures / "identities").glob("*/*.jpg")) if p.parent.name != "barack_obama"),
              *sorted((fixtures / "faces" / "photos").glob("*.jpg"))]
    for photo in [obama[-1], *others]:
        shutil.copy2(photo, gallery / photo.name)
    shutil.copy2(obama[0], probes / obama[0].name)
    for photo in bundled_sample_photos():
        shutil.copy2(photo, probes / photo.name)
    return gallery, probes
