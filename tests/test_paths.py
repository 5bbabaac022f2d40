"""Caller-given paths are confined to the gallery roots: `..` and symlinks are resolved first."""

from __future__ import annotations

import os

import pytest

from facegate.paths import PathRefused, confine, confined_images


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "root"
    (root / "g").mkdir(parents=True)
    (root / "g" / "a.jpg").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    return root, outside


def test_inside_is_accepted(roots):
    root, _ = roots
    assert confine(root / "g" / "a.jpg", [root]) == (root / "g" / "a.jpg").resolve()


def test_dotdot_escape_is_refused(roots):
    root, _ = roots
    with pytest.raises(PathRefused, match="outside the gallery roots"):
        confine(str(root / "g" / ".." / ".." / "outside" / "secret.jpg"), [root])


def test_symlink_escape_is_refused(roots):
    root, outside = roots
    os.symlink(outside, root / "g" / "link")
    with pytest.raises(PathRefused, match="resolves to"):
        confine(root / "g" / "link" / "secret.jpg", [root])


def test_symlinked_file_inside_a_folder_is_refused_when_listing(roots):
    root, outside = roots
    os.symlink(outside / "secret.jpg", root / "g" / "innocent.jpg")
    with pytest.raises(PathRefused, match="innocent.jpg"):
        confined_images([root / "g"], [root])


def test_missing_path_and_no_roots(roots, tmp_path):
    root, _ = roots
    with pytest.raises(PathRefused, match="no such file"):
        confine(root / "nope.jpg", [root])
    with pytest.raises(PathRefused, match="no gallery roots"):
        confine(root, [])


def test_folder_expands_to_images_only(roots):
    root, _ = roots
    (root / "g" / "notes.txt").write_text("x")
    (root / "g" / ".hidden.jpg").write_bytes(b"x")
    assert [p.name for p in confined_images([root / "g"], [root])] == ["a.jpg"]
