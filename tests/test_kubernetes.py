"""deploy/kubernetes/ agrees with itself, the config schema, the CLI, the routes and the Dockerfile.

Parsing only (no cluster): each check reads the values from both sides, so a change to one side
that the other does not follow fails here.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.cli.commands import build_parser
from proxy.config import Config, load_config_text
from tests.support.configs import example_environ

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = "kustomization.yaml"
CLUSTER_SCOPED = {"Namespace"}
PLACEHOLDER = "REPLACE_ME"
WORKLOADS = ("Deployment", "StatefulSet")


def _documents(name: str) -> list[dict[str, Any]]:
    text = (K8S / name).read_text(encoding="utf-8")
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def _manifest_files() -> list[str]:
    return sorted(p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml") and p.name != KUSTOMIZATION)


def _resources() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name in _manifest_files() for doc in _documents(name)]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in _resources() if doc.get("kind") == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _kustomization() -> dict[str, Any]:
    (doc,) = _documents(KUSTOMIZATION)
    return doc


def _proxy() -> dict[str, Any]:
    return _one("Deployment", "llm-proxy")


def _pod_spec() -> dict[str, Any]:
    return _proxy()["spec"]["template"]["spec"]


def _pod_labels() -> dict[str, str]:
    return _proxy()["spec"]["template"]["metadata"]["labels"]


def _container() -> dict[str, Any]:
    (container,) = [c for c in _pod_spec()["containers"] if c["name"] == "proxy"]
    return container


def _args():
    return build_parser().parse_args(_container()["args"])


def _container_port(container: dict[str, Any], ref: int | str) -> int:
    """A probe's or Service's port (a number, or the name of one of the container's ports)."""
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if isinstance(ref, str):
        assert ref in ports, f"port {ref!r} is not a named port of container {container['name']}"
        return ports[ref]
    assert ref in ports.values(), f"port {ref} is not declared by container {container['name']}"
    return ref


def _configmap() -> dict[str, Any]:
    (volume,) = [v for v in _pod_spec()["volumes"] if "configMap" in v]
    return _one("ConfigMap", volume["configMap"]["name"])


def _config_text() -> str:
    (text,) = _configmap()["data"].values()
    return text


def _config() -> Config:
    """The ConfigMap's config, with a value for each variable it names."""
    text = _config_text()
    return load_config_text(text, environ=example_environ(text))


def _secret() -> dict[str, Any]:
    (ref,) = [source["secretRef"] for source in _container()["envFrom"] if "secretRef" in source]
    return _one("Secret", ref["name"])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _route_exists(path: str) -> bool:
    source = (ROOT / "proxy" / "http" / "ops_api.py").read_text(encoding="utf-8")
    return f'@api.get("{path}")' in source


# -- the files ---------------------------------------------------------------------------------


def test_every_resource_names_its_api_kind_and_name() -> None:
    resources = _resources()
    kinds = sorted(doc.get("kind", "?") for _, doc in resources)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "StatefulSet",
    ]
    namespace = _kustomization()["namespace"]
    assert _one("Namespace", namespace)
    for name, doc in resources:
        assert doc.get("apiVersion"), f"{name}: a resource without apiVersion"
        assert doc.get("kind"), f"{name}: a resource without kind"
        assert doc.get("metadata", {}).get("name"), f"{name}: a {doc['kind']} without metadata.name"
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == namespace, f"{name}: {doc['kind']} outside {namespace}"


def test_kustomization_lists_exactly_the_manifests() -> None:
    listed = _kustomization()["resources"]
    assert len(listed) == len(set(listed)), "a manifest is listed twice"
    assert sorted(listed) == _manifest_files()


# -- config, CLI and ports ---------------------------------------------------------------------


def test_configmap_holds_a_valid_config() -> None:
    config = _config()
    assert config.store.redis_url == "redis://redis:6379/0"
    assert config.upstreams["deepseek"].base_url == "https://api.deepseek.com/v1"
    assert config.upstreams["deepseek"].api_key_env == "DEEPSEEK_API_KEY"
    assert config.upstreams["deepseek"].api_key is None
    assert config.admin_key_env == "LLM_PROXY_ADMIN_KEY"
    assert config.keys, "no proxy keys"
    for name, key in config.keys.items():
        assert key.key_env and key.key is None, f"keys.{name}: read from the Secret via key_env"


def test_redis_url_names_the_redis_service() -> None:
    url = urlsplit(_config().store.redis_url)
    service = _one("Service", url.hostname)
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    (redis,) = [
        doc
        for _, doc in _resources()
        if doc["kind"] in WORKLOADS
        and _selects(service["spec"]["selector"], doc["spec"]["template"]["metadata"]["labels"])
    ]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert _container_port(container, port["targetPort"]) == 6379


def test_redis_keeps_its_data_with_aof_on_a_claim() -> None:
    """Without persistence a Redis restart forgets the day's spend and resets every budget."""
    redis = _one("StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == "/data"  # the redis image's working directory, where the AOF goes
    assert "volumes" not in redis["spec"]["template"]["spec"], "an emptyDir would shadow the claim"
    assert redis["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 1000  # the image's redis group


def test_container_args_serve_the_mounted_config() -> None:
    container = _container()
    assert "command" not in container, "the image's ENTRYPOINT (llm-proxy) must stay in place"
    args = _args()
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    configmap = _configmap()
    (volume,) = [v for v in _pod_spec()["volumes"] if "configMap" in v]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount.get("readOnly") is True
    assert "subPath" not in mount
    (key,) = configmap["data"]
    files = {item["path"]: item["key"] for item in volume["configMap"].get("items", [])} or {key: key}
    config_path = PurePosixPath(args.config)
    assert config_path.parent == PurePosixPath(mount["mountPath"])
    assert files.get(config_path.name) == key == "config.yaml"


def test_listen_port_container_port_and_service_agree() -> None:
    config, args, container = _config(), _args(), _container()
    assert args.port == config.listen.port
    assert _container_port(container, "http") == args.port
    service = _one("Service", "llm-proxy")
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert _container_port(container, port["targetPort"]) == args.port


def test_probes_hit_the_ops_routes_on_the_serving_port() -> None:
    container, port = _container(), _args().port
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz" and _route_exists("/readyz")
    assert liveness["path"] == "/healthz" and _route_exists("/healthz")
    assert _container_port(container, readiness["port"]) == port
    assert _container_port(container, liveness["port"]) == port


def test_prometheus_annotations_point_at_metrics() -> None:
    annotations = _proxy()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(_args().port)
    assert _container_port(_container(), int(annotations["prometheus.io/port"])) == _args().port
    assert annotations["prometheus.io/path"] == "/metrics" and _route_exists("/metrics")


# -- secrets -----------------------------------------------------------------------------------


def test_secret_provides_every_variable_the_config_names() -> None:
    config = _config()
    names = {upstream.api_key_env for upstream in config.upstreams.values() if upstream.api_key_env}
    names |= {key.key_env for key in config.keys.values() if key.key_env}
    names.add(config.admin_key_env)
    names.discard(None)
    assert {"DEEPSEEK_API_KEY", "LLM_PROXY_ADMIN_KEY"} <= names
    provided = set(_secret()["stringData"])
    assert names <= provided, f"not in the Secret: {sorted(names - provided)}"


def test_secret_holds_only_placeholders() -> None:
    secret = _secret()
    assert "data" not in secret, "example values go in stringData, as placeholders"
    for name, value in secret["stringData"].items():
        assert value == PLACEHOLDER, f"{name}: the example Secret must not hold a real value"


# -- selectors, scheduling and disruption ------------------------------------------------------


def test_selectors_match_the_proxy_pods_only() -> None:
    labels = _pod_labels()
    proxy_selector = _proxy()["spec"]["selector"]["matchLabels"]
    service_selector = _one("Service", "llm-proxy")["spec"]["selector"]
    pdb_selector = _one("PodDisruptionBudget", "llm-proxy")["spec"]["selector"]["matchLabels"]
    for selector in (proxy_selector, service_selector, pdb_selector):
        assert _selects(selector, labels), f"{selector} does not select the proxy pods {labels}"
    others = [
        doc["spec"]["template"]["metadata"]["labels"]
        for _, doc in _resources()
        if doc["kind"] in WORKLOADS and doc["metadata"]["name"] != "llm-proxy"
    ]
    assert others, "redis.yaml's StatefulSet is missing"
    for other in others:
        assert not _selects(service_selector, other), "the proxy Service also selects Redis"
        assert not _selects(pdb_selector, other), "the proxy PDB also selects Redis"


def test_pods_spread_across_nodes() -> None:
    spec, labels = _pod_spec(), _pod_labels()
    constraints = spec.get("topologySpreadConstraints", [])
    by_node = [c for c in constraints if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node, "no spread across nodes"
    for constraint in constraints:
        assert _selects(constraint["labelSelector"]["matchLabels"], labels)


def test_disruption_budget_leaves_room_to_drain() -> None:
    replicas = _proxy()["spec"]["replicas"]
    min_available = _one("PodDisruptionBudget", "llm-proxy")["spec"]["minAvailable"]
    assert min_available == 2
    assert min_available < replicas, "a PDB with minAvailable >= replicas blocks every drain"


def test_store_replicas_counts_every_fallback_process() -> None:
    """With on_redis_error=allow, each *process* admits limits/store.replicas on its own."""
    replicas, workers = _proxy()["spec"]["replicas"], _args().workers
    assert replicas == 3 and workers == 2
    assert _config().store.replicas == replicas * workers


# -- the container -----------------------------------------------------------------------------


def test_runs_as_the_dockerfiles_user_on_a_read_only_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (uid,) = re.findall(r"--uid\s+(\d+)", dockerfile)
    pod_context = _pod_spec().get("securityContext", {})
    container = _container()
    context = {**pod_context, **container.get("securityContext", {})}
    assert context["runAsUser"] == int(uid)
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    empty_dirs = {v["name"] for v in _pod_spec()["volumes"] if "emptyDir" in v}
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1 and tmp[0]["name"] in empty_dirs, "--workers N keeps its metrics in /tmp"


def test_grace_period_outlasts_the_proxys_shutdown() -> None:
    spec = _pod_spec()
    pre_stop = _container().get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    assert spec["terminationGracePeriodSeconds"] > _config().shutdown_grace_s + pre_stop_s


@pytest.mark.parametrize("kind", ["requests", "limits"])
def test_resources_are_set(kind: str) -> None:
    resources = _container()["resources"][kind]
    assert resources["cpu"] and resources["memory"]
