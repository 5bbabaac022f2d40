"""The deployment files: docker-compose.yml and docker/Dockerfile, read as data.

`docker compose config` would be the first check (it resolves anchors, interpolation and the schema), but
Docker does not run on these machines; PyYAML resolves the anchors and merge keys, and these tests check
what the deployment depends on.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from facegate.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"

APP_SERVICES = {"api": "api", "worker": "worker", "worker-cpu": "worker", "beat": "beat", "flower": "flower"}
BACKENDS = {"redis", "postgres", "milvus"}
GPU_RESERVATION = [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
# Not (yet) fields of Settings, but read by FaceGate: the CLI's key, and Flower's settings (read with getattr).
EXTRA_VARIABLES = {"FACEGATE_API_KEY", "FACEGATE_FLOWER_BASIC_AUTH", "FACEGATE_FLOWER_PORT", "FACEGATE_FLOWER_ADDRESS"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _ports(service: dict) -> list[dict]:
    """Published ports as (host_ip, published, target), from the short or the long syntax."""
    ports = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.append({"host_ip": entry.get("host_ip"), "published": str(entry.get("published")),
                          "target": str(entry["target"])})
            continue
        # "[host_ip:]published:target[/proto]"; host_ip may itself be an interpolation like ${X:-127.0.0.1}.
        match = re.fullmatch(r"(?:(?P<ip>\$\{[^}]+\}|\d+\.\d+\.\d+\.\d+|\[[0-9a-fA-F:]+\]):)?(?:(?P<published>\d+):)?"
                             r"(?P<target>\d+)(?:/\w+)?", str(entry))
        assert match, f"cannot read port mapping {entry!r}"
        ports.append({"host_ip": match["ip"], "published": match["published"], "target": match["target"]})
    return ports


def _depends(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _named_volumes(service: dict) -> list[tuple[str, str, bool]]:
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append((entry["source"], entry["target"], bool(entry.get("read_only"))))
            continue
        source, target, *mode = str(entry).split(":")
        mounts.append((source, target, bool(mode) and "ro" in mode[0].split(",")))
    return mounts


def test_every_service_is_there_with_an_image_or_a_build(services):
    expected = {"redis", "etcd", "minio", "milvus", "postgres", *APP_SERVICES}
    assert expected <= set(services), f"missing services: {sorted(expected - set(services))}"
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
    assert services["milvus"]["image"].startswith("milvusdb/milvus:")
    assert services["milvus"]["command"] == ["milvus", "run", "standalone"]
    assert services["etcd"]["image"].startswith("quay.io/coreos/etcd:")
    assert services["minio"]["image"].startswith("minio/minio:")
    assert _environment(services["milvus"])["ETCD_ENDPOINTS"] == "etcd:2379"
    assert _environment(services["milvus"])["MINIO_ADDRESS"] == "minio:9000"
    # One FaceGate image, built from docker/Dockerfile at the repository root, running `facegate <command>`.
    images = set()
    for name, command in APP_SERVICES.items():
        service = services[name]
        assert service["build"] == {"context": ".", "dockerfile": "docker/Dockerfile"}, name
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        images.add(service["image"])
        assert service["command"] == [command], name
    assert len(images) == 1, f"the FaceGate services should share one image, not {sorted(images)}"


def test_compose_commands_are_facegate_commands(services):
    import typer

    from cli.app import app

    commands = set(typer.main.get_command(app).commands)
    missing = {services[name]["command"][0] for name in APP_SERVICES} - commands
    assert not missing, f"docker-compose.yml runs `facegate {' / '.join(sorted(missing))}`, which cli/app.py " \
                        f"does not register (it has: {', '.join(sorted(commands))})"


def test_only_the_api_and_flower_are_published_flower_on_loopback(services):
    for name, service in services.items():
        if name not in ("api", "flower"):
            assert not service.get("ports"), f"{name} publishes {service['ports']}: keep it on the compose network"
    flower = _ports(services["flower"])
    assert flower and all(p["host_ip"] == "127.0.0.1" for p in flower), \
        f"Flower must be published on 127.0.0.1 only (/metrics answers without auth): {flower}"
    assert [p["target"] for p in flower] == ["5555"]
    assert _environment(services["flower"])["FACEGATE_FLOWER_PORT"] == "5555"
    api = _ports(services["api"])
    assert [(p["published"], p["target"]) for p in api] == [("8000", "8000")]
    assert _environment(services["api"])["FACEGATE_API_HOST"] == "0.0.0.0"  # inside its container


def test_dependencies_wait_for_healthy_backends(services):
    for name in ("redis", "postgres", "milvus", "api", "etcd", "minio"):
        test = services[name].get("healthcheck", {}).get("test")
        assert test, f"{name} has no health check"
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ("api", "worker", "worker-cpu", "beat"):
        deps = _depends(services[name])
        for backend in BACKENDS:
            assert deps.get(backend) == "service_healthy", f"{name} must wait for {backend} to be healthy"
    assert _depends(services["milvus"]) == {"etcd": "service_healthy", "minio": "service_healthy"}
    assert _depends(services["flower"]).get("redis") == "service_healthy"
    # Every dependency's condition can be met: service_healthy needs a health check.
    for name, service in services.items():
        for dep, condition in _depends(service).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy; it has no check"


def test_the_gpu_worker_reserves_a_gpu_and_the_cpu_worker_none(services):
    worker, cpu = services["worker"], services["worker-cpu"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == GPU_RESERVATION
    assert "profiles" not in worker
    assert cpu.get("profiles") == ["cpu"]
    assert not (cpu.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices")
    assert _environment(cpu)["FACEGATE_DEVICE"] == "cpu"
    assert _environment(worker)["FACEGATE_DEVICE"] in ("cuda", "auto")
    for name, service in services.items():
        if name != "worker":
            assert "nvidia" not in json.dumps(service.get("deploy") or {}), f"{name} should not reserve a GPU"


def test_volumes_are_declared_and_galleries_mounted_read_only(compose, services):
    declared = set(compose.get("volumes") or {})
    for volume in ("postgres-data", "redis-data", "etcd-data", "minio-data", "milvus-data", "facegate-data",
                   "galleries", "torch-cache"):
        assert volume in declared, f"volume {volume} is not declared"
    for name, service in services.items():
        for source, _target, _ in _named_volumes(service):
            if not source.startswith((".", "/", "$", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
    assert ("postgres-data", "/var/lib/postgresql/data", False) in _named_volumes(services["postgres"])
    assert ("redis-data", "/data", False) in _named_volumes(services["redis"])
    for name in ("api", "worker", "worker-cpu", "beat"):
        mounts = _named_volumes(services[name])
        assert ("galleries", "/galleries", True) in mounts, f"{name}: galleries must be mounted read-only at /galleries"
        assert ("facegate-data", "/var/lib/facegate", False) in mounts, f"{name} needs the shared data volume"
        env = _environment(services[name])
        assert env["FACEGATE_GALLERY_ROOTS"] == "/galleries" and env["FACEGATE_DATA_DIR"] == "/var/lib/facegate"
    for name in ("worker", "worker-cpu"):
        assert any(source == "torch-cache" for source, _, _ in _named_volumes(services[name]))
        assert _environment(services[name])["TORCH_HOME"] == "/var/cache/torch"


def test_configuration_by_environment(services):
    for name in ("api", "worker", "worker-cpu", "beat"):
        env = _environment(services[name])
        # The broker and Milvus require credentials from .env: no default, compose refuses without them.
        assert env["FACEGATE_BROKER_URL"] == "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}@redis:6379/0"
        assert env["FACEGATE_MILVUS_URI"] == "http://milvus:19530"
        assert env["FACEGATE_MILVUS_TOKEN"].startswith("root:${MILVUS_ROOT_PASSWORD:?")
        assert ":?" in env["FACEGATE_DATABASE_URL"]
        assert env["FACEGATE_DATABASE_URL"].startswith("postgresql+psycopg://facegate:")
        assert env["FACEGATE_DATABASE_URL"].endswith("@postgres:5432/facegate")
        # No default secret: compose refuses to start without one (${VAR:?message}).
        assert env["FACEGATE_TICKET_SECRET"].startswith("${FACEGATE_TICKET_SECRET:?")
    redis_command = " ".join(services["redis"]["command"])
    assert "--requirepass ${REDIS_PASSWORD:?" in redis_command
    milvus = _environment(services["milvus"])
    assert milvus["COMMON_SECURITY_AUTHORIZATIONENABLED"] == "true"
    assert milvus["COMMON_SECURITY_DEFAULTROOTPASSWORD"].startswith("${MILVUS_ROOT_PASSWORD:?")
    assert "minioadmin" not in json.dumps(services)
    flower = _environment(services["flower"])
    assert flower["FACEGATE_FLOWER_BASIC_AUTH"].startswith("${FACEGATE_FLOWER_BASIC_AUTH")
    # Flower needs the broker only: it gets no ticket secret and no database.
    assert "FACEGATE_TICKET_SECRET" not in flower and "FACEGATE_DATABASE_URL" not in flower


def _setting_names() -> set[str]:
    return {f"FACEGATE_{name.upper()}" for name in Settings.model_fields} | EXTRA_VARIABLES


def test_every_facegate_variable_is_a_setting(services):
    used: dict[str, set[str]] = {}
    for name, service in services.items():
        for key in _environment(service):
            if key.startswith("FACEGATE_"):
                used.setdefault(key, set()).add(f"services.{name}.environment")
    for text, where in ((COMPOSE.read_text(), "docker-compose.yml"), (DOCKERFILE.read_text(), "docker/Dockerfile")):
        for key in re.findall(r"\b(FACEGATE_[A-Z0-9_]+)", text):
            used.setdefault(key, set()).add(where)
    unknown = {key: sorted(where) for key, where in used.items() if key not in _setting_names()}
    assert not unknown, "FACEGATE_* variables that are not settings (typo, or a setting that was renamed): " + \
        "; ".join(f"{key} in {', '.join(where)}" for key, where in sorted(unknown.items()))


def test_dockerfile_builds_the_locked_project_and_runs_facegate():
    assert DOCKERFILE.is_file()
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip()
             and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert re.search(r"pip install [^\n]*\buv\b", text), "uv is not installed"
    assert re.search(r"uv sync --frozen --no-dev(?! --no-install-project)", text), "no `uv sync --frozen --no-dev`"
    entrypoint = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert len(entrypoint) == 1
    assert json.loads(entrypoint[0][len("ENTRYPOINT"):]) == ["uv", "run", "--no-sync", "facegate"]
    # Not root at run time.
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_image_holds_every_package_the_code_imports():
    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*([A-Za-z_][\w]*)/?\s", text, flags=re.M))
    local = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    # Start from what the wheel lists, follow imports between the repository's own packages.
    pyproject = (ROOT / "pyproject.toml").read_text()
    listed = re.search(r"\[tool\.hatch\.build\.targets\.wheel\]\s*packages\s*=\s*\[([^\]]*)\]", pyproject)
    needed = set(re.findall(r'"([^"]+)"', listed[1])) if listed else {"facegate", "cli"}
    todo = list(needed)
    while todo:
        package = todo.pop()
        for module in (ROOT / package).rglob("*.py"):
            for name in _top_level_imports(module) & local:
                if name not in needed and name != "tests":
                    needed.add(name)
                    todo.append(name)
    missing = needed - copied
    assert not missing, f"docker/Dockerfile does not COPY {sorted(missing)}, which the code imports"
    for name in ("pyproject.toml", "uv.lock", "README.md"):  # hatchling reads the README
        assert re.search(rf"^COPY\s[^\n]*\b{re.escape(name)}\b", text, flags=re.M), f"{name} is not copied"
