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
    with pytest.raises(PathRefused, match="outside the gallery roots") as refused:
        confine(root / "g" / "link" / "secret.jpg", [root])
    assert str(outside) not in str(refused.value)  # where the link points is not told


def test_outside_reads_the_same_whether_it_exists_or_not(roots, tmp_path):
    root, outside = roots
    exists = str(confine_error(outside / "secret.jpg", root)).replace("secret.jpg", "X")
    missing = str(confine_error(outside / "nothing.jpg", root)).replace("nothing.jpg", "X")
    assert exists == missing and "no such file" not in missing


def test_nul_byte_is_a_clear_refusal(roots):
    root, _ = roots
    with pytest.raises(PathRefused, match="NUL"):
        confine(str(root / "g") + "\x00/a.jpg", [root])


def confine_error(path, root):
    with pytest.raises(PathRefused) as refused:
        confine(path, [root])
    return refused.value


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
