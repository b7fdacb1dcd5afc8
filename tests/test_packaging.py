"""The shipped files agree with each other: example configs load, the compose file's references
exist, and the Dockerfile, compose file and console script name the same things.

(The compose file's schema validation runs in .ci/run: the schema is not part of the repo.)
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import load_config
from tests.support.configs import example_environ

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED_ON = "${PUBLISH_ADDRESS:-127.0.0.1}"
CONFIG_DIRS = ("examples", "deploy/compose")
CONFIG_FILES = sorted(
    path.relative_to(ROOT).as_posix()
    for folder in CONFIG_DIRS
    for pattern in ("**/*.yaml", "**/*.yml")
    for path in (ROOT / folder).glob(pattern)
)
# Values for some variables the configs name; any other name gets a placeholder.
EXAMPLE_ENV = {"LLM_PROXY_REDIS_URL": "redis://127.0.0.1:6379/0"}


def _environ_for(text: str) -> dict[str, str]:
    return example_environ(text, EXAMPLE_ENV)


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _instruction(name: str) -> list[str]:
    return [rest for keyword, rest in _dockerfile_instructions() if keyword == name]


def test_the_shipped_configs_are_found() -> None:
    for expected in ("examples/config.deepseek.yaml", "examples/config.openai.yaml", "deploy/compose/config.yaml"):
        assert expected in CONFIG_FILES


@pytest.mark.parametrize("relative", CONFIG_FILES)
def test_config_file_loads(relative: str) -> None:
    path = ROOT / relative
    config = load_config(path, _environ_for(path.read_text(encoding="utf-8")))
    hashes = [key.key_sha256 for key in config.keys.values() if key.key_sha256]
    assert len(hashes) == len(set(hashes)), "two keys share one key_sha256: the second is unreachable"


def test_compose_services() -> None:
    services = _compose()["services"]
    assert set(services) >= {"redis", "mock-upstream", "proxy"}
    assert services["redis"]["image"].startswith("redis:7")
    assert services["mock-upstream"]["entrypoint"][-2:] == ["-m", "proxy.mock_upstream"]
    assert (ROOT / "proxy" / "mock_upstream.py").is_file()
    depends = services["proxy"]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert "mock-upstream" in depends


def test_compose_references_exist() -> None:
    for name, service in _compose()["services"].items():
        build = service.get("build")
        if build is not None:
            spec = {"context": build} if isinstance(build, str) else build
            context = ROOT / spec.get("context", ".")
            assert context.is_dir(), f"{name}: build context {context} is missing"
            assert (context / spec.get("dockerfile", "Dockerfile")).is_file(), f"{name}: Dockerfile missing"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: mounted {source} is missing"


def test_proxy_command_serves_the_mounted_config() -> None:
    proxy = _compose()["services"]["proxy"]
    command = proxy["command"]
    assert command[0] == "serve"
    assert "--workers" in command
    config_path = command[command.index("--config") + 1]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in proxy["volumes"]}
    assert config_path in mounts, "the --config path is not mounted into the container"
    assert (ROOT / mounts[config_path]).resolve() == ROOT / "deploy" / "compose" / "config.yaml"
    assert proxy["ports"] == [f"{PUBLISHED_ON}:8080:8080"]


def test_compose_publishes_ports_on_loopback_unless_told() -> None:
    """The stack ships demo keys and Grafana's default password: nothing listens beyond the host
    until PUBLISH_ADDRESS says so."""
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith(PUBLISHED_ON + ":"), f"{name}: {port}"


def test_compose_redis_keeps_its_data_with_aof_on_a_volume() -> None:
    """Without persistence a Redis restart forgets the day's spend and resets every budget."""
    compose = _compose()
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    (volume,) = redis["volumes"]
    name, path = volume.split(":")
    assert path == "/data" and name in compose["volumes"]  # a named volume: it outlives the container


def test_compose_proxy_stop_grace_exceeds_shutdown_grace() -> None:
    proxy = _compose()["services"]["proxy"]
    config = load_config(
        ROOT / "deploy" / "compose" / "config.yaml",
        _environ_for((ROOT / "deploy" / "compose" / "config.yaml").read_text(encoding="utf-8")),
    )
    grace = proxy["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > config.shutdown_grace_s


def test_dockerfile_healthcheck_probes_healthz_on_the_exposed_port() -> None:
    (healthcheck,) = _instruction("HEALTHCHECK")
    urls = re.findall(r"https?://[^'\"\s]+", healthcheck)
    assert len(urls) == 1
    url = urlsplit(urls[0])
    assert url.path == "/healthz"
    assert _instruction("EXPOSE") == [str(url.port)]


def test_dockerfile_runs_the_console_script_as_a_non_root_user() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["llm-proxy"] == "proxy.cli:main"
    assert [json.loads(entry) for entry in _instruction("ENTRYPOINT")] == [["llm-proxy"]]
    (cmd,) = _instruction("CMD")
    assert json.loads(cmd)[:3] == ["serve", "--config", "/etc/llm-proxy/config.yaml"]
    users = _instruction("USER")
    assert users and users[-1] not in ("root", "0")


def test_dockerfile_copies_only_existing_package_files() -> None:
    for copy in _instruction("COPY"):
        *sources, _destination = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing (the image would not build)"


def test_the_image_demo_listens_where_docker_run_p_reaches_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker run -p 8080:8080 IMAGE demo`: inside the image the demo binds 0.0.0.0, outside 127.0.0.1.
    (CI's .ci/docker/image_checks.py runs exactly that and calls it from the host.)"""
    from proxy.cli.commands import DEMO_HOST_ENV, build_parser

    (env,) = _instruction("ENV")
    assert f"{DEMO_HOST_ENV}=0.0.0.0" in env.split()
    monkeypatch.delenv(DEMO_HOST_ENV, raising=False)
    assert build_parser().parse_args(["demo"]).host == "127.0.0.1"
    monkeypatch.setenv(DEMO_HOST_ENV, "0.0.0.0")
    assert build_parser().parse_args(["demo"]).host == "0.0.0.0"


def test_the_image_installs_with_the_pinned_constraints() -> None:
    (install,) = [run for run in _instruction("RUN") if "pip install" in run]
    assert "--constraint constraints.txt" in install
    pins = [
        line
        for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    assert pins and all("==" in line for line in pins), "every line of constraints.txt pins one version"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [*declared["dependencies"], *declared["optional-dependencies"]["examples"]]
    pinned = {re.split(r"[=;\s]", line)[0].lower().replace("_", "-") for line in pins}
    for requirement in wanted:
        name = re.split(r"[<>=\[;\s]", requirement)[0].lower().replace("_", "-")
        assert name in pinned, f"constraints.txt does not pin {name}"


def test_dockerignore_lets_through_only_what_the_image_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "ignore everything, then let through what the Dockerfile copies"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {source.rstrip("/") for copy in _instruction("COPY") for source in copy.split()[:-1]}
    assert allowed == copied
