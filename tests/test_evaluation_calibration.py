"""facegate.calibration: similarity -> false-match rate for one model version, and its store."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from facegate.calibration import Calibration, CalibrationError, CalibrationKept, CalibrationStore

VERSION = "inception-resnet-v1:vggface2-abc123"


def _calibration(scores=None, version: str = VERSION) -> Calibration:
    return Calibration.from_impostor_scores(
        np.arange(1000) / 1000 if scores is None else scores,  # 0.000 .. 0.999
        model_version=version,
        dataset="lfw",
        n_genuine=3000,
        weights_sha256="AB" * 32,
        created_at=dt.datetime(2025, 1, 2, tzinfo=dt.UTC),
    )


def test_built_from_impostor_scores():
    calibration = _calibration()
    assert calibration.n_impostor == 1000
    assert calibration.resolution_limit == pytest.approx(1e-3)
    assert calibration.weights_sha256 == "ab" * 32  # normalised as the settings do
    assert len(calibration.table) == 1000  # every distinct score: nothing thinned at this size
    fmrs = [point.fmr for point in calibration.table]
    assert fmrs[0] == 1.0 and fmrs[-1] == pytest.approx(1e-3)
    assert all(later <= earlier for earlier, later in zip(fmrs, fmrs[1:]))


def test_threshold_for_fmr():
    calibration = _calibration()
    # Ten impostor scores (0.990 .. 0.999) are >= 0.99: FMR 1%; any lower observed score gives 1.1%.
    assert calibration.threshold_for_fmr(1e-2) == 0.99
    assert calibration.threshold_for_fmr(1e-3) == 0.999  # exactly at the resolution limit: allowed
    assert calibration.threshold_for_fmr(1.0) == 0.0


def test_threshold_for_fmr_below_resolution_limit_raises_clearly():
    calibration = _calibration()
    with pytest.raises(CalibrationError) as raised:
        calibration.threshold_for_fmr(1e-4)
    message = str(raised.value)
    assert "below the resolution limit 0.001" in message
    assert "1000 impostor pairs" in message
    assert VERSION in message
    assert "at least 10000 impostor pairs" in message


def test_threshold_for_fmr_when_impostors_tie_at_the_top():
    calibration = _calibration(np.r_[[0.9, 0.9], np.linspace(0, 0.5, 98)])
    threshold = calibration.threshold_for_fmr(1e-2)
    assert threshold > 0.9
    assert calibration.fmr_at(threshold).below_resolution_limit


def test_fmr_at_step_interpolation():
    calibration = _calibration()
    assert calibration.fmr_at(0.99) == (pytest.approx(0.01), False)
    assert calibration.fmr_at(0.9905) == (pytest.approx(0.009), False)  # scores 0.991 .. 0.999
    assert calibration.fmr_at(-0.5) == (1.0, False)
    assert calibration.fmr_at(0.999) == (pytest.approx(0.001), False)
    above_everything = calibration.fmr_at(0.9995)
    assert above_everything.below_resolution_limit is True
    assert above_everything.fmr == pytest.approx(1e-3)  # read: FMR < 0.001


def test_large_calibration_is_thinned_but_stays_conservative():
    rng = np.random.default_rng(7)
    scores = rng.normal(0.0, 0.1, 200_000)
    calibration = _calibration(scores)
    assert len(calibration.table) < 5_000

    for target in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        threshold = calibration.threshold_for_fmr(target)
        true_fmr = np.mean(scores >= threshold)
        assert true_fmr <= target
        assert true_fmr >= target / 1.02 - 1 / scores.size  # no more than a grid step too strict

    tail = np.sort(scores)[-500]  # low-FMR end: exact
    assert calibration.fmr_at(tail).fmr == pytest.approx(np.mean(scores >= tail))
    assert calibration.fmr_at(tail + 1e-9).fmr == pytest.approx(np.mean(scores >= tail + 1e-9))
    for similarity in (-0.2, 0.0, 0.1):  # thinned region: an upper bound within a grid step
        true_fmr = np.mean(scores >= similarity)
        estimate = calibration.fmr_at(similarity).fmr
        assert true_fmr <= estimate <= true_fmr * 1.02


def test_save_load_round_trip(tmp_path):
    calibration = _calibration()
    path = calibration.save(tmp_path / "nested" / "calibration.json")
    loaded = Calibration.load(path)
    assert loaded == calibration
    on_disk = json.loads(path.read_text())
    assert on_disk["model_version"] == VERSION
    assert on_disk["n_impostor"] == 1000 and on_disk["n_genuine"] == 3000
    assert on_disk["resolution_limit"] == pytest.approx(1e-3)


def test_load_rejects_a_non_monotone_table(tmp_path):
    data = json.loads(_calibration().model_dump_json())
    data["table"][5]["fmr"] = 0.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="bad.json"):
        Calibration.load(path)
    with pytest.raises(CalibrationError, match="does not exist"):
        Calibration.load(tmp_path / "missing.json")


def test_store_path_is_safe_for_any_version_string(tmp_path):
    store = CalibrationStore(tmp_path / "calibrations")
    hostile = "inception-resnet-v1:abc/../x"
    path = store.path_for(hostile)
    assert path.parent == store.directory
    assert path.resolve().parent == store.directory.resolve()
    assert "/" not in path.name and ".." not in path.name and ":" not in path.name
    assert path.name.startswith("inception-resnet-v1_abc_x-") and path.suffix == ".json"
    # Versions that read the same once cleaned still get different files.
    assert store.path_for("inception-resnet-v1:abc/__x") != path
    assert store.path_for("../../etc/passwd").parent == store.directory


def test_store_put_and_get(tmp_path):
    store = CalibrationStore(tmp_path / "calibrations")
    hostile = "inception-resnet-v1:abc/../x"
    assert store.get(hostile) is None
    calibration = _calibration(version=hostile)
    written = store.put(calibration)
    assert written == store.path_for(hostile)
    assert store.get(hostile) == calibration
    assert list(store.directory.iterdir()) == [written]  # no temporary file left behind


def test_less_evidence_never_replaces_more_unless_asked(tmp_path):
    store = CalibrationStore(tmp_path)
    large = _calibration().model_copy(update={"run_by": "university-lab-example (key k1)",
                                             "dataset_fingerprint": "f" * 64})
    store.put(large)
    small = _calibration(np.arange(144) / 144)
    with pytest.raises(CalibrationKept) as kept:
        store.put(small)
    assert str(kept.value) == (
        f"the calibration in force for {VERSION} was kept: it rests on 1000 impostor pairs (lfw, 2025-01-02 00:00 "
        "UTC, run by university-lab-example (key k1)), this run on only 144; pass --replace-calibration to "
        "replace it with less evidence")
    assert store.get(VERSION) == large
    store.put(_calibration(np.arange(1000) / 1001))  # as much evidence: replaces
    assert store.get(VERSION).max_impostor_score == pytest.approx(999 / 1001)
    store.put(small, replace=True)  # asked for
    assert store.get(VERSION).n_impostor == 144


def test_a_calibration_written_before_who_and_fingerprint_were_recorded_still_loads(tmp_path):
    store = CalibrationStore(tmp_path)
    path = store.put(_calibration())
    data = json.loads(path.read_text())
    data.pop("run_by"), data.pop("dataset_fingerprint")
    path.write_text(json.dumps(data))
    assert store.get(VERSION).run_by is None and store.get(VERSION).n_impostor == 1000
