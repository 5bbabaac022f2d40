"""Which vector index a gallery gets (index/policy.py), and the settings that decide it."""

from __future__ import annotations

import pytest

from facegate.settings import Settings
from index import IndexChoice, IndexPolicy, choose_index


def test_below_the_size_or_on_milvus_lite_a_gallery_is_searched_flat():
    policy = IndexPolicy(ann_min_faces=1000)
    assert choose_index(999, lite=False, policy=policy) == IndexChoice("FLAT")
    assert choose_index(0, lite=False, policy=policy).index_type == "FLAT"
    assert choose_index(10**7, lite=True, policy=policy) == IndexChoice("FLAT")


def test_at_the_size_on_a_server_a_gallery_gets_hnsw_with_the_policys_parameters():
    policy = IndexPolicy(ann_min_faces=1000, hnsw_m=24, hnsw_ef_construction=300, hnsw_ef=64)
    for faces in (1000, 10**6):
        choice = choose_index(faces, lite=False, policy=policy)
        assert choice.index_type == "HNSW"
        assert choice.build_params == {"M": 24, "efConstruction": 300}
        assert choice.search_params == {"ef": 64}
    assert choose_index(100_000, lite=False).index_type == "HNSW"  # the default size
    assert choose_index(99_999, lite=False).index_type == "FLAT"


def test_hnsw_search_beam_is_raised_to_the_top_k_and_flat_takes_none():
    hnsw = choose_index(5, lite=False, policy=IndexPolicy(ann_min_faces=1, hnsw_ef=128))
    assert hnsw.search_params_for(10) == {"ef": 128}
    assert hnsw.search_params_for(500) == {"ef": 500}  # Milvus refuses ef below the top-k
    assert IndexChoice("FLAT").search_params_for(500) == {}
    assert hnsw.as_dict() == {"type": "HNSW", "build_params": {"M": 16, "efConstruction": 200},
                              "search_params": {"ef": 128}}


def test_the_policy_reads_its_settings_from_the_environment(monkeypatch):
    assert IndexPolicy.from_settings(Settings()) == IndexPolicy() == IndexPolicy(100_000, 16, 200, 2048)
    monkeypatch.setenv("FACEGATE_MILVUS_ANN_MIN_FACES", "50")
    monkeypatch.setenv("FACEGATE_MILVUS_HNSW_M", "32")
    monkeypatch.setenv("FACEGATE_MILVUS_HNSW_EF_CONSTRUCTION", "400")
    monkeypatch.setenv("FACEGATE_MILVUS_HNSW_EF", "256")
    assert IndexPolicy.from_settings(Settings()) == IndexPolicy(50, 32, 400, 256)


def test_index_settings_out_of_range_are_refused_by_name(monkeypatch):
    monkeypatch.setenv("FACEGATE_MILVUS_HNSW_M", "1")
    with pytest.raises(ValueError, match="milvus_hnsw_m"):
        Settings()


def test_a_lite_files_index_is_told_without_opening_the_file(tmp_path):
    from index import gallery_index

    shown = gallery_index(str(tmp_path / "milvus.db"), None, "archive")
    assert shown == {"type": "FLAT", "build_params": {}, "search_params": {}, "metric": None, "engine": "milvus-lite"}
    assert not (tmp_path / "milvus.db").exists()  # the embedded worker's, not this process's to open


def test_a_server_that_does_not_answer_is_shown_as_an_error_naming_it():
    from index import gallery_index

    shown = gallery_index("http://127.0.0.1:1", None, "archive")
    assert shown is not None and set(shown) == {"error"}
    assert "http://127.0.0.1:1 could not be reached" in shown["error"]
