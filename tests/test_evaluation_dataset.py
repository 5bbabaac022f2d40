"""evaluation.dataset: LFW-layout folders, pairs files, generated pairs, group labels, identification split.

The images are solid colours made with PIL: this package never looks inside them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from PIL import Image

from evaluation.dataset import (
    UNLABELLED,
    DatasetError,
    gallery_probe_split,
    generate_pairs,
    pair_folds,
    pair_group_values,
    pair_labels,
    read_group_labels,
    read_pairs_file,
    scan_identity_folders,
)


def make_lfw(root: Path, image_counts: dict[str, int], suffix: str = ".jpg") -> Path:
    """Folders `root/<name>/<name>_0001.jpg ...`, as LFW names them."""
    for index, (name, count) in enumerate(image_counts.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for number in range(1, count + 1):
            colour = ((index * 40) % 256, (number * 60) % 256, 128)
            Image.new("RGB", (8, 8), colour).save(folder / f"{name}_{number:04d}{suffix}")
    return root


@pytest.fixture
def lfw(tmp_path):
    return make_lfw(tmp_path / "lfw", {"Alice_Smith": 3, "Bob_Jones": 2, "Carol_White": 1})


# Scanning ----------------------------------------------------------------------------------------


def test_scan_lfw_layout(lfw):
    (lfw / "pairs.txt").write_text("ignored: files beside the identity folders\n")
    (lfw / "Alice_Smith" / "notes.txt").write_text("not an image")
    (lfw / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(lfw / "Bob_Jones" / "Bob_Jones_0003.PNG")  # suffixes are case-blind
    dataset = scan_identity_folders(lfw)
    assert dataset.identities == ["Alice_Smith", "Bob_Jones", "Carol_White"]
    assert len(dataset.images) == 7
    assert dataset.name == "lfw"
    assert [p.name for p in dataset.images_of("Bob_Jones")] == [
        "Bob_Jones_0001.jpg",
        "Bob_Jones_0002.jpg",
        "Bob_Jones_0003.PNG",
    ]


def test_scan_missing_folder_names_it(tmp_path):
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        scan_identity_folders(tmp_path / "nowhere")


def test_scan_one_identity_errors_clearly(tmp_path):
    root = make_lfw(tmp_path / "solo", {"Only_Person": 4})
    with pytest.raises(DatasetError, match="a dataset with one identity cannot measure false matches"):
        scan_identity_folders(root)


def test_scan_identity_without_images_names_the_folder(lfw):
    (lfw / "Dave_Empty").mkdir()
    (lfw / "Dave_Empty" / "readme.txt").write_text("no pictures here")
    with pytest.raises(DatasetError, match="no images.*Dave_Empty"):
        scan_identity_folders(lfw)


# Pairs files -------------------------------------------------------------------------------------


def test_pairs_file_with_fold_header(lfw, tmp_path):
    dataset = scan_identity_folders(lfw)
    pairs_path = tmp_path / "pairs.txt"
    pairs_path.write_text(
        "2\t1\n"
        "Alice_Smith\t1\t2\n"
        "Alice_Smith\t1\tCarol_White\t1\n"
        "Bob_Jones\t1\t2\n"
        "Bob_Jones\t2\tAlice_Smith\t3\n"
    )
    pairs = read_pairs_file(pairs_path, dataset)
    assert [p.fold for p in pairs] == [0, 0, 1, 1]
    assert pair_labels(pairs).tolist() == [1, 0, 1, 0]
    assert pair_folds(pairs).tolist() == [0, 0, 1, 1]
    assert pairs[0].first == lfw / "Alice_Smith" / "Alice_Smith_0001.jpg"
    assert pairs[0].second == lfw / "Alice_Smith" / "Alice_Smith_0002.jpg"
    assert (pairs[3].first_identity, pairs[3].second_identity) == ("Bob_Jones", "Alice_Smith")
    assert pairs[3].second.name == "Alice_Smith_0003.jpg"


def test_pairs_file_with_single_count_header_has_no_folds(lfw, tmp_path):
    dataset = scan_identity_folders(lfw)
    pairs_path = tmp_path / "pairsDevTest.txt"
    pairs_path.write_text(
        "2\n"
        "Alice_Smith 2 3\n"  # spaces work as well as tabs
        "Bob_Jones\t1\t2\n"
        "Alice_Smith\t1\tBob_Jones\t1\n"
        "Carol_White\t1\tBob_Jones\t2\n"
    )
    pairs = read_pairs_file(pairs_path, dataset)
    assert [p.is_genuine for p in pairs] == [True, True, False, False]
    assert all(p.fold is None for p in pairs)
    with pytest.raises(DatasetError, match="no fold"):
        pair_folds(pairs)


def test_pairs_file_malformed_line_names_the_line(lfw, tmp_path):
    dataset = scan_identity_folders(lfw)
    pairs_path = tmp_path / "pairs.txt"
    pairs_path.write_text("Alice_Smith\t1\t2\nAlice_Smith\t1\tBob_Jones\nBob_Jones\t1\t2\n")
    with pytest.raises(DatasetError, match=r"pairs.txt line 2: expected"):
        read_pairs_file(pairs_path, dataset)


def test_pairs_file_missing_image_names_line_and_file(lfw, tmp_path):
    dataset = scan_identity_folders(lfw)
    pairs_path = tmp_path / "pairs.txt"
    pairs_path.write_text("1\nAlice_Smith\t1\t2\nAlice_Smith\t1\tCarol_White\t7\n")
    with pytest.raises(DatasetError, match=r"line 3: image 7 of 'Carol_White' \(Carol_White_0007\.\*\)"):
        read_pairs_file(pairs_path, dataset)


def test_pairs_file_count_must_match_header(lfw, tmp_path):
    dataset = scan_identity_folders(lfw)
    pairs_path = tmp_path / "pairs.txt"
    pairs_path.write_text("10\t300\nAlice_Smith\t1\t2\n")
    with pytest.raises(DatasetError, match="line 1: the header says 10 folds.*6000 pair lines.*has 1"):
        read_pairs_file(pairs_path, dataset)


# Generated pairs ---------------------------------------------------------------------------------


@pytest.fixture
def twenty_people(tmp_path):
    counts = {f"Person_{i:02d}": 3 if i % 4 else 1 for i in range(20)}
    return scan_identity_folders(make_lfw(tmp_path / "twenty", counts))


def test_generate_pairs_is_balanced_fold_disjoint_and_deterministic(twenty_people):
    pairs = generate_pairs(twenty_people, n_folds=5, seed=3)
    labels = pair_labels(pairs)
    assert labels.sum() * 2 == len(labels) > 0
    folds_of_identity: dict[str, set[int]] = {}
    for pair in pairs:
        for identity in (pair.first_identity, pair.second_identity):
            folds_of_identity.setdefault(identity, set()).add(pair.fold)
    assert all(len(folds) == 1 for folds in folds_of_identity.values())
    for fold in set(pair_folds(pairs).tolist()):
        in_fold = [p for p in pairs if p.fold == fold]
        assert sum(p.is_genuine for p in in_fold) * 2 == len(in_fold)
    assert len({(p.first, p.second) for p in pairs}) == len(pairs)  # no pair twice

    assert generate_pairs(twenty_people, n_folds=5, seed=3) == pairs
    assert generate_pairs(twenty_people, n_folds=5, seed=4) != pairs


def test_generate_pairs_with_too_few_identities_uses_fewer_folds(lfw):
    dataset = scan_identity_folders(lfw)
    with pytest.warns(UserWarning, match="too few for 10 identity-disjoint folds; using 1 fold"):
        pairs = generate_pairs(dataset, n_folds=10)
    assert set(pair_folds(pairs).tolist()) == {0}
    assert pair_labels(pairs).sum() * 2 == len(pairs)


def test_generate_pairs_without_warning_when_enough_identities(twenty_people):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(set(pair_folds(generate_pairs(twenty_people, n_folds=10)).tolist())) == 10


# Group labels ------------------------------------------------------------------------------------


def test_group_labels(lfw, tmp_path):
    dataset = scan_identity_folders(lfw)
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text(
        "\ufeffidentity,skin_tone,gender\nAlice_Smith,darker,female\nBob_Jones,lighter,male\nCarol_White,darker,\n",
        encoding="utf-8",
    )
    labels = read_group_labels(csv_path, dataset)
    assert labels["Alice_Smith"] == {"skin_tone": "darker", "gender": "female"}
    assert labels["Carol_White"]["gender"] == UNLABELLED  # blank cell
    pairs = read_pairs_file(_tiny_pairs(tmp_path), dataset)
    assert pair_group_values(pairs, labels, "skin_tone") == [("darker", "darker"), ("darker", "lighter")]


def _tiny_pairs(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_pairs.txt"
    path.write_text("Alice_Smith\t1\t2\nCarol_White\t1\tBob_Jones\t1\n")
    return path


def test_group_labels_unknown_identity_errors_clearly(lfw, tmp_path):
    dataset = scan_identity_folders(lfw)
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text(
        "identity,skin_tone\nAlice_Smith,darker\nBob_Jones,lighter\nCarol_White,darker\nZed_Unknown,lighter\n"
    )
    with pytest.raises(DatasetError, match="1 identities are not in the dataset.*Zed_Unknown"):
        read_group_labels(csv_path, dataset, allow_unlabelled=True)


def test_group_labels_missing_identity_is_an_error_unless_allowed(lfw, tmp_path):
    dataset = scan_identity_folders(lfw)
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text("identity,skin_tone\nAlice_Smith,darker\n")
    with pytest.raises(DatasetError, match="2 identities of the dataset have no labels: Bob_Jones, Carol_White"):
        read_group_labels(csv_path, dataset)
    labels = read_group_labels(csv_path, dataset, allow_unlabelled=True)
    assert labels["Bob_Jones"] == {"skin_tone": UNLABELLED}


def test_group_labels_header_must_start_with_identity(lfw, tmp_path):
    dataset = scan_identity_folders(lfw)
    csv_path = tmp_path / "groups.csv"
    csv_path.write_text("name,skin_tone\nAlice_Smith,darker\n")
    with pytest.raises(DatasetError, match="line 1: the header must be 'identity'"):
        read_group_labels(csv_path, dataset)


# Identification split ----------------------------------------------------------------------------


def test_gallery_probe_split(twenty_people):
    split = gallery_probe_split(twenty_people, seed=1, unknown_fraction=0.2)
    assert split == gallery_probe_split(twenty_people, seed=1, unknown_fraction=0.2)

    gallery_ids = [identity for identity, _ in split.gallery]
    unknown_ids = {identity for identity, _ in split.unknown_probes}
    assert len(gallery_ids) == len(set(gallery_ids))  # one image per enrolled identity
    assert len(unknown_ids) == 4  # 20% of 20
    assert not unknown_ids & set(gallery_ids)
    assert {identity for identity, _ in split.known_probes} <= set(gallery_ids)
    assert split.known_probes
    every_image = split.gallery + split.known_probes + split.unknown_probes
    assert sorted(every_image) == sorted(twenty_people.images)  # each image used exactly once
