"""The image, built from the shipped Dockerfile: no build warning, a small context, non-root, healthy,
and `docker run -p 8080:8080 IMAGE demo` answering from the host. CI only (.ci/docker/run)."""

from __future__ import annotations

import re
import time

import httpx
from ci_docker import ROOT, fail, inspect, main, ok, run, say, wait_for, wait_healthy
from openai import OpenAI

IMAGE = "llm-ratelimit-proxy:latest"  # the name deploy/kubernetes/deployment.yaml uses
DEMO_KEY_PATTERN = re.compile(r"key (sk-\S+)")
MAX_CONTEXT_BYTES = 2_000_000
WARNING = re.compile(r"warn|deprecat", re.IGNORECASE)
CONTEXT_PROBE = """FROM python:3.11-slim
COPY . /context
RUN find /context -type f | sort && du -sb /context
"""


def build() -> None:
    started = time.monotonic()
    done = run(["docker", "build", "--progress=plain", "-t", IMAGE, "."], env={"DOCKER_BUILDKIT": "1"})
    output = done.stdout + done.stderr
    warnings = [line for line in output.splitlines() if WARNING.search(line)]
    if warnings:
        fail("the image build printed warnings:\n" + "\n".join(warnings))
    ok(f"docker build: no warning ({time.monotonic() - started:.1f} s)")


def context() -> None:
    """What the daemon receives: the files .dockerignore lets through, listed from inside a build."""
    probe = "llm-proxy-ci/context-probe"
    done = run(
        ["docker", "build", "--progress=plain", "--no-cache", "-t", probe, "-f", "-", "."],
        env={"DOCKER_BUILDKIT": "1"},
        input_text=CONTEXT_PROBE,
    )
    run(["docker", "rmi", probe], check=False)
    payloads = re.findall(r"^#\d+ [\d.]+ (.*)$", done.stdout + done.stderr, re.MULTILINE)
    files = [p for p in payloads if p.startswith("/context/")]
    sizes = [p for p in payloads if re.fullmatch(r"\d+\s+/context", p)]
    if not files or not sizes:
        fail(f"could not read the build context listing:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    size = int(sizes[-1].split()[0])
    allowed = ("/context/pyproject.toml", "/context/README.md", "/context/constraints.txt", "/context/proxy/")
    stray = [f for f in files if not f.startswith(allowed)]
    if stray:
        fail(f".dockerignore lets through {len(stray)} files it should not: {stray[:20]}")
    if any("__pycache__" in f for f in files):
        fail(".dockerignore lets __pycache__ through")
    if size > MAX_CONTEXT_BYTES:
        fail(f"build context is {size} bytes (> {MAX_CONTEXT_BYTES})")
    ok(f"build context: {len(files)} files, {size / 1024:.0f} KiB")


def metadata() -> None:
    config = inspect(IMAGE)["Config"]
    user = config.get("User") or "root"
    if user in ("root", "0") or user.startswith("0:"):
        fail(f"the image runs as {user!r}")
    uid = run(["docker", "run", "--rm", "--entrypoint", "id", IMAGE, "-u"]).stdout.strip()
    if uid == "0":
        fail("`id -u` in the image is 0")
    if not config.get("Healthcheck"):
        fail("the image has no HEALTHCHECK")
    size = inspect(IMAGE)["Size"]
    ok(
        f"runs as {user} (uid {uid}); HEALTHCHECK set; image size {size / 1e6:.0f} MB "
        "(on the CI stand-in for python:3.11-slim, Debian's python3 + pip)"
    )
    pins = run(["docker", "run", "--rm", "--entrypoint", "pip", IMAGE, "freeze"]).stdout.lower().split()
    wanted = {
        line.strip().lower()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    runtime = {"fastapi", "uvicorn", "aiohttp", "httpx", "redis", "prometheus_client", "pydantic", "pyyaml", "orjson"}
    for name in runtime:
        pinned = [w for w in wanted if w.replace("-", "_").split("==")[0] == name.replace("-", "_")]
        if not pinned:
            fail(f"constraints.txt does not pin {name}")
        if not any(p.replace("-", "_") == pinned[0].replace("-", "_") for p in pins):
            fail(f"the image does not have {pinned[0]} (constraints.txt): {sorted(pins)}")
    ok("the image's dependencies are the versions constraints.txt pins")


def demo() -> None:
    """`docker run -p 8080:8080 IMAGE demo`, bound to the host's loopback, and the SDK through it."""
    name = "llm-proxy-ci-demo"
    run(["docker", "rm", "-f", name], check=False)
    run(["docker", "run", "-d", "--name", name, "-p", "127.0.0.1:8080:8080", IMAGE, "demo"])
    try:
        took = wait_healthy(name, timeout_s=60)
        ok(f"HEALTHCHECK healthy after {took:.1f} s (demo)")
        logs = wait_for(
            "the demo's banner", lambda: DEMO_KEY_PATTERN.search(run(["docker", "logs", name]).stdout), timeout_s=10
        )
        health = httpx.get("http://127.0.0.1:8080/healthz", timeout=5)
        if health.status_code != 200:
            fail(f"/healthz from the host: {health.status_code}")
        client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=logs.group(1), max_retries=0, timeout=10)
        reply = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "Hello"}])
        if not reply.choices[0].message.content:
            fail(f"empty demo reply: {reply}")
        ok("docker run -p 8080:8080 IMAGE demo answers the OpenAI SDK from the host")
        started = time.monotonic()
        run(["docker", "stop", "-t", "10", name])
        state = inspect(name)["State"]
        say(f"demo stopped on SIGTERM in {time.monotonic() - started:.1f} s, exit code {state['ExitCode']}")
    finally:
        run(["docker", "rm", "-f", name], check=False)


def checks() -> None:
    build()
    context()
    metadata()
    demo()


if __name__ == "__main__":
    main(checks)
