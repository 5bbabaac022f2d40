"""`facegate demo` with no flag on a machine without the VGGFace2 weights and without internet: it runs on
dlib's real model, says so on its first line, and finds a person across two different photos."""

from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT
from tests.e2e import run_cli

pytestmark = pytest.mark.slow


def test_demo_without_vggface2_uses_dlib_and_finds_obama_in_another_photo(tmp_path):
    if not (ROOT.parent / "shared" / "fixtures" / "identities" / "barack_obama").is_dir():
        pytest.skip("needs ../shared/fixtures/identities beside the checkout")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    # No weights in the torch cache, and no way out: every download is refused at once (loopback stays
    # reachable, for the embedded Redis and Milvus).
    env.update(FACEGATE_DATA_DIR=str(tmp_path / "data"), TORCH_HOME=str(tmp_path / "torch"),
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost", COLUMNS="200")
    done = run_cli(["demo"], env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, *rest = done.stdout.splitlines()
    assert first.startswith("model: dlib-resnet-v1 ") and "VGGFace2 weights cannot be had here" in first
    text = "\n".join(rest)
    # Obama's other photo is found above the floor of photo-library for dlib (0.93); nobody else is.
    assert "probe obama_1.jpg: best match obama_2.jpg" in text
    assert "everyone else in the gallery is below the threshold" in text
    assert "probe grace_hopper.jpg: nobody in the gallery reaches the threshold" in text
    assert "search threshold 0.93" in text and "UNTRAINED" not in done.stdout + done.stderr
    assert "DENIED, nothing queued" in text
