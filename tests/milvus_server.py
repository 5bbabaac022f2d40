"""A real Milvus standalone server for the tests: the `milvus` package's (2.3.5, a dev dependency).

One server per test session (it starts in about 7 s), on free loopback ports of its own: the proxy and
every coordinator and node port, the metrics/health port, and its embedded etcd's client and peer ports
(the embedded etcd listens on 2379 and 2380 whatever the config's endpoints say unless it is given an
etcd config file: a second server, or an etcd of the user's, would clash). FACEGATE_TEST_MILVUS_URI names
a server given over to the tests instead (they create and drop `facegate_*` collections there).
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_MS = 120_000


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, all held until all are chosen."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class MilvusStandalone:
    """The `milvus` package's server in a directory of its own, every port chosen free."""

    def __init__(self, base_dir: Path) -> None:
        from milvus import MilvusServer, MilvusServerConfig

        self.base_dir = base_dir
        config = MilvusServerConfig()
        port_keys = sorted(k for k in config.configurable_items if k.endswith("_port"))
        ports = dict(zip([*port_keys, "etcd_peer", "metrics"], _free_ports(len(port_keys) + 2)))
        etcd_yaml = base_dir / "etcd.yaml"
        base_dir.mkdir(parents=True, exist_ok=True)
        client_url = f"http://127.0.0.1:{ports['etcd_port']}"
        peer_url = f"http://127.0.0.1:{ports['etcd_peer']}"
        etcd_yaml.write_text(
            "name: facegate-test\n"
            f"listen-client-urls: {client_url}\nadvertise-client-urls: {client_url}\n"
            f"listen-peer-urls: {peer_url}\ninitial-advertise-peer-urls: {peer_url}\n"
            f"initial-cluster: facegate-test={peer_url}\n")
        # The package's template has no etcd.config.path; the embedded etcd reads its URLs from that file.
        config.template_text = config.template_text.replace(
            "etcd:\n  endpoints:", f"etcd:\n  config:\n    path: {etcd_yaml}\n  endpoints:", 1)
        if str(etcd_yaml) not in config.template_text:
            raise RuntimeError("the milvus package's config template has no `etcd:` section to extend")
        self.server = MilvusServer(config, **{k: ports[k] for k in port_keys})
        self.server.webservice_port = ports["metrics"]  # the health/metrics port; the package tries 9091 up
        self.server.set_base_dir(str(base_dir))
        self.port = ports["proxy_port"]
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server.wait_for_started = False
        self.server.start()
        self.server.wait_started(timeout=STARTUP_TIMEOUT_MS)

    def log_tail(self, chars: int = 2000) -> str:
        logs = sorted((self.base_dir / "logs").glob("*.log"))
        return "\n".join(f"{p.name}: {p.read_text(errors='replace')[-chars:]}" for p in logs)

    def stop(self) -> None:
        self.server.stop()


def _cannot_start_reason() -> str | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the milvus package ships a server for Linux x86_64 only, not {platform.system()} {platform.machine()}"
    try:
        import milvus  # noqa: F401
    except ImportError:
        return "the milvus package (a dev dependency) is not installed: `uv sync` installs it"
    return None


@pytest.fixture(scope="session")
def milvus_server_uri() -> Iterator[str]:
    """The URI of a real Milvus server: the suite's own standalone one, or FACEGATE_TEST_MILVUS_URI."""
    configured = os.environ.get("FACEGATE_TEST_MILVUS_URI")
    if configured:
        yield configured
        return
    reason = _cannot_start_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="fg-milvus-"))
    server = MilvusStandalone(base)
    try:
        server.start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        tail = server.log_tail()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"the Milvus standalone server (milvus package) did not start: {exc}\n{tail}")
    try:
        yield server.uri
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
