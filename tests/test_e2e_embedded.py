"""The embedded defaults: no broker configured, the CLI starts Redis and a worker itself."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ALIGNED, FIXTURES, make_settings, register
from tests.e2e import env_for, run_cli

pytestmark = pytest.mark.slow


def test_embedded_index_and_search_with_no_broker(tmp_path):
    settings = make_settings(tmp_path)
    _, token = register(settings)
    env = env_for(settings, FACEGATE_API_KEY=token)
    assert not any(k == "FACEGATE_BROKER_URL" for k in env)
    index = run_cli(["index", str(FIXTURES / "aligned"), "--gallery", "emb", "--purpose", "research", "--json"], env)
    assert index.returncode == 0, index.stderr
    assert "embedded Redis" in index.stderr
    assert json.loads(index.stdout)["faces"] == len(ALIGNED)

    search = run_cli(["search", str(ALIGNED[0]), "--gallery", "emb", "--purpose", "research", "--threshold", "0",
                      "--json"], env)
    assert search.returncode == 0, search.stderr
    top = json.loads(search.stdout)["results"][0]["matches"][0]
    assert top["image_path"] == str(ALIGNED[0]) and top["similarity"] > 0.99
    # The embedded store is a Milvus Lite file in the data directory.
    assert (settings.data_dir / "milvus.db").exists()


def test_embedded_mode_says_how_to_get_weights_when_there_are_none(tmp_path):
    settings = make_settings(tmp_path, weights="vggface2")
    _, token = register(settings)
    env = env_for(settings, TORCH_HOME=str(tmp_path / "torch"), FACEGATE_API_KEY=token)
    # Unroutable proxy: the download fails quickly and deterministically even on a machine with internet.
    env.update(HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    result = run_cli(["index", str(FIXTURES / "photos"), "--gallery", "w", "--purpose", "research"], env)
    assert result.returncode == 2
    assert "FACEGATE_WEIGHTS" in result.stderr and "untrained" in result.stderr


def test_demo_on_bundled_photos(tmp_path):
    env = env_for(make_settings(tmp_path))
    result = run_cli(["demo", "--untrained"], env)
    assert result.returncode == 0, result.stderr
    assert "UNTRAINED" in result.stdout + result.stderr
    assert "grace_hopper" in result.stdout
    # The demo also shows the moratorium at work.
    assert "DENIED" in result.stdout and "rekognition-police-moratorium" in result.stdout
