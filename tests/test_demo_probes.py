"""`facegate demo DIR` cuts its probes from the images it can read, and passes over the rest."""

from __future__ import annotations

import shutil

from cli.demo import prepare_demo
from tests.conftest import PHOTOS


def test_demo_probes_come_only_from_readable_images(tmp_path):
    source = tmp_path / "mine"
    source.mkdir()
    shutil.copy(PHOTOS[0], source / "person.jpg")
    (source / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))  # listed, but not readable
    gallery, probes = prepare_demo(tmp_path / "demo", source)
    assert gallery == source.resolve()
    assert sorted(p.name for p in probes.iterdir()) == ["person-crop.jpg", "person-mirror.jpg", "person-small.jpg"]
