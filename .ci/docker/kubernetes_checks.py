"""deploy/kubernetes: `kubectl kustomize` renders it, the result passes strict schema validation for
two Kubernetes versions, and its pods run under docker with the settings the manifests give them
(user, read-only root file system, dropped capabilities, no privilege escalation, volumes, memory
limit), their probes pass, and the proxy's preStop plus SIGTERM end within its grace period.

CI only (.ci/docker/run). No cluster: docker plays the kubelet for one pod of each workload.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from ci_docker import fail, inspect, main, ok, run, say, wait_for

KUBERNETES_VERSIONS = ("1.35.0", "1.37.0")  # the oldest and newest minors supported in December 2026
NETWORK = "llm-proxy-ci-k8s"
PREFIX = "llm-proxy-ci-k8s-"


def render() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        fail("kubectl is not installed")
    done = run([kubectl, "kustomize", "deploy/kubernetes"])
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    version = run([kubectl, "version", "--client"], check=False).stdout.replace("\n", "; ")
    ok(f"kubectl kustomize deploy/kubernetes renders {len(docs)} resources ({version.strip('; ')})")
    return docs


def validate(rendered: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(rendered)
        f.flush()
        for version in KUBERNETES_VERSIONS:
            done = run(["kubernetes-validate", "--strict", "--quiet", "-k", version, f.name], check=False)
            if done.returncode != 0 or "ERROR" in done.stdout + done.stderr:
                fail(f"strict schema validation for Kubernetes {version}:\n{done.stdout}{done.stderr}")
    ok(f"strict schema validation passes for Kubernetes {' and '.join(KUBERNETES_VERSIONS)}")


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(found) != 1:
        fail(f"expected one {kind}/{name}, found {len(found)}")
    return found[0]


def memory(quantity: str) -> str:
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    for suffix, docker_unit in units.items():
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + docker_unit
    return quantity


def docker_run_args(pod: dict[str, Any], workdir: Path, docs: list[dict[str, Any]], name: str) -> list[str]:
    """`docker run` options for the pod's one container, as a kubelet would apply them."""
    (container,) = pod["containers"]
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    args = ["--name", PREFIX + name, "--network", NETWORK, "--network-alias", name]
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    if (pod_sc.get("runAsNonRoot") or sc.get("runAsNonRoot")) and not user:
        fail(f"{name}: runAsNonRoot without a numeric runAsUser")
    if user is not None:
        args += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if "fsGroup" in pod_sc:
        args += ["--group-add", str(pod_sc["fsGroup"])]
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    for cap in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    if limit:
        args += ["--memory", memory(limit)]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None:  # a volumeClaimTemplate: a docker volume stands in for the claim
            args += ["--mount", f"type=volume,source={PREFIX}{name}-{mount['name']},target={mount['mountPath']}"]
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit")
            options = f"rw,exec,mode=1777{',size=' + memory(size) if size else ''}"
            args += ["--tmpfs", f"{mount['mountPath']}:{options}"]
        elif "configMap" in volume:
            data = one(docs, "ConfigMap", volume["configMap"]["name"])["data"]
            folder = workdir / mount["name"]
            folder.mkdir()
            for item in volume["configMap"].get("items", [{"key": k, "path": k} for k in data]):
                (folder / item["path"]).write_text(data[item["key"]], encoding="utf-8")
                (folder / item["path"]).chmod(0o644)
            folder.chmod(0o755)
            args += ["-v", f"{folder}:{mount['mountPath']}:ro"]
        else:
            fail(f"{name}: volume {mount['name']} of a kind this check does not stand in for")
    for source in container.get("envFrom", []):
        secret = one(docs, "Secret", source["secretRef"]["name"])
        for key, value in secret.get("stringData", {}).items():
            # as a user does: every placeholder replaced, each by a secret of its own (the proxy
            # refuses one key in two entries, so shared placeholders would not start)
            args += ["-e", f"{key}=ci-{key.lower()}" if value == "REPLACE_ME" else f"{key}={value}"]
    for port in container.get("ports", []):
        args += ["-p", f"127.0.0.1::{port['containerPort']}"]
    args.append(container["image"])
    args += container.get("args", [])
    if "command" in container:
        fail(f"{name}: command overrides the image's ENTRYPOINT; this check does not stand in for it")
    return args


def probe(name: str, container: dict[str, Any], kind: str) -> None:
    spec = container.get(kind)
    if spec is None:
        fail(f"{name}: no {kind}")
    ctr = PREFIX + name
    timeout = spec.get("timeoutSeconds", 1)
    period = spec.get("periodSeconds", 10)

    def once() -> bool | None:
        if "httpGet" in spec:
            port = spec["httpGet"]["port"]
            if isinstance(port, str):
                port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
            host_port = run(["docker", "port", ctr, f"{port}/tcp"]).stdout.split()[0].rsplit(":", 1)[1]
            response = httpx.get(f"http://127.0.0.1:{host_port}{spec['httpGet']['path']}", timeout=timeout)
            return True if 200 <= response.status_code < 400 else None
        if "exec" in spec:
            done = run(["docker", "exec", ctr, *spec["exec"]["command"]], check=False, timeout=timeout + 5)
            return True if done.returncode == 0 else None
        if "tcpSocket" in spec:  # to the pod's address on the docker bridge, as the kubelet would
            port = spec["tcpSocket"]["port"]
            if isinstance(port, str):
                port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
            address = inspect(ctr)["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
            socket.create_connection((address, port), timeout).close()
            return True
        fail(f"{name}: {kind} of a kind this check does not run")

    started = time.monotonic()
    wait_for(f"{name}'s {kind}", once, spec.get("initialDelaySeconds", 0) + 60, interval_s=min(period, 2))
    ok(f"{name}: {kind} passes ({time.monotonic() - started:.1f} s)")


def run_pod(docs: list[dict[str, Any]], kind: str, name: str, workdir: Path) -> dict[str, Any]:
    workload = one(docs, kind, name)
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    image = container["image"]
    if run(["docker", "image", "inspect", image], check=False).returncode != 0:
        fail(f"{name}: image {image} is not built")
    run(["docker", "run", "-d", *docker_run_args(pod, workdir, docs, name)])
    ctr = PREFIX + name
    settings = inspect(ctr)["HostConfig"]
    uid = run(["docker", "exec", ctr, "id", "-u"]).stdout.strip()
    if uid == "0":
        fail(f"{name} runs as root")
    writable = run(["docker", "exec", ctr, "sh", "-c", "touch /probe-rootfs"], check=False)
    if writable.returncode == 0:
        fail(f"{name}: the root file system is writable")
    caps = run(["docker", "exec", ctr, "grep", "CapEff", "/proc/self/status"]).stdout.split()[-1]
    if int(caps, 16) != 0:
        fail(f"{name}: effective capabilities {caps}")
    say(
        f"{name}: uid {uid}, read-only root fs, capabilities {caps}, "
        f"memory limit {settings['Memory'] // 2**20} MiB, security-opt {settings['SecurityOpt']}"
    )
    for probe_kind in ("readinessProbe", "livenessProbe"):
        probe(name, container, probe_kind)
    return pod


def stop_pod(name: str, pod: dict[str, Any]) -> None:
    """The kubelet's way: the preStop hook, then SIGTERM, SIGKILL at terminationGracePeriodSeconds."""
    (container,) = pod["containers"]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    ctr = PREFIX + name
    started = time.monotonic()
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop:
        run(["docker", "exec", ctr, *pre_stop["exec"]["command"]], timeout=grace)
    hook_s = time.monotonic() - started
    run(["docker", "stop", "-t", str(max(1, int(grace - hook_s))), ctr], timeout=grace + 30)
    took = time.monotonic() - started
    code = inspect(ctr)["State"]["ExitCode"]
    if code != 0 or took >= grace:
        fail(f"{name}: preStop + SIGTERM took {took:.1f} s of its {grace} s grace, exit {code}")
    ok(
        f"{name}: preStop ({hook_s:.1f} s) then SIGTERM: exit 0 after {took:.1f} s "
        f"(terminationGracePeriodSeconds {grace})"
    )


def cleanup() -> None:
    for name in ("llm-proxy", "redis"):
        run(["docker", "rm", "-f", "-v", PREFIX + name], check=False)
    run(["docker", "volume", "rm", "-f", f"{PREFIX}redis-data"], check=False)
    run(["docker", "network", "rm", NETWORK], check=False)


def checks() -> None:
    docs = render()
    validate(yaml.safe_dump_all(docs))
    cleanup()
    run(["docker", "network", "create", NETWORK])
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp).chmod(0o755)
        try:
            run_pod(docs, "StatefulSet", "redis", Path(tmp))
            aof = run(["docker", "exec", PREFIX + "redis", "redis-cli", "config", "get", "appendonly"]).stdout.split()
            if aof != ["appendonly", "yes"]:
                fail(f"the StatefulSet's Redis runs without AOF: {aof}")
            run(["docker", "exec", PREFIX + "redis", "ls", "/data/appendonlydir"])
            ok("redis: AOF on, written to the claim's volume (/data/appendonlydir)")
            pod = run_pod(docs, "Deployment", "llm-proxy", Path(tmp))
            port = run(["docker", "port", PREFIX + "llm-proxy", "8080/tcp"]).stdout.split()[0].rsplit(":", 1)[1]
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
            if ready != {"status": "ready"}:
                fail(f"llm-proxy does not reach the redis Service: /readyz {ready}")
            ok("llm-proxy reaches Redis by its Service name (/readyz: ready)")
            stop_pod("llm-proxy", pod)
        except Exception:
            for name in ("llm-proxy", "redis"):
                logs = run(["docker", "logs", "--tail", "30", PREFIX + name], check=False)
                print(f"--- {name}\n{logs.stdout}{logs.stderr}")
            raise
        finally:
            cleanup()


if __name__ == "__main__":
    main(checks)
