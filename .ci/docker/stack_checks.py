"""docker-compose.yml, run for real: every service healthy, a chat through the published port,
Prometheus scraping with every alert rule loaded and every dashboard query answered, Redis keeping
the day's spend across a restart, a moved upstream served again, and clean stops.

CI only (.ci/docker/run). Grafana's image cannot be had on CI machines: the stack runs without it,
and the dashboard's queries are evaluated against the stack's Prometheus instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import yaml
from ci_docker import ROOT, CheckFailed, fail, inspect, main, ok, run, say, wait_for, wait_healthy
from openai import OpenAI

sys.path.insert(0, str(ROOT))
from tests.test_observability_stack import DASHBOARD, alert_rules, grafana_to_promql

PROJECT = "llmproxyci"
SKIPPED = {"grafana"}  # no image on CI machines (see the module docstring)
PROXY = "http://127.0.0.1:8080"
PROMETHEUS = "http://127.0.0.1:9090"
PLATFORM_KEY, RESEARCH_KEY, ADMIN_KEY = "sk-platform-dev", "sk-research-dev", "sk-admin-dev"
CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
STOP_LIMIT_S = 5.0
SCRAPE_INTERVAL_S = 15  # deploy/prometheus/prometheus.yml: a panel's step, so $__rate_interval is 1m
MOVED_UPSTREAM_LIMIT_S = 5.0


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where the plugin is installed, else v1 (`docker-compose`)."""
    if run(["docker", "compose", "version"], check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    fail("neither `docker compose` nor `docker-compose` is installed")


COMPOSE = compose_command()


def compose(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run(
        [*COMPOSE, "-p", PROJECT, *args],
        check=check,
        timeout=timeout,
        env={"COMPOSE_DOCKER_CLI_BUILD": "1", "DOCKER_BUILDKIT": "1"},
    )


def services() -> list[str]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    return [name for name in data["services"] if name not in SKIPPED]


def container(service: str) -> str:
    found = compose("ps", "-q", service).stdout.split()
    if len(found) != 1:
        fail(f"expected one {service} container, found {found}")
    return found[0]


def sdk(key: str = PLATFORM_KEY, **headers: str) -> OpenAI:
    return OpenAI(base_url=PROXY + "/v1", api_key=key, max_retries=0, timeout=30, default_headers=headers)


def fault(**fields: Any) -> dict[str, str]:
    return {"x-mock-fault": json.dumps(fields)}


def chat_ok() -> bool | None:
    response = httpx.post(
        PROXY + "/v1/chat/completions", json=CHAT, timeout=5, headers={"Authorization": f"Bearer {PLATFORM_KEY}"}
    )
    return True if response.status_code == 200 else None


def usage() -> dict[str, Any] | None:
    """The day's usage report, or None while the proxy cannot read it (503 during a Redis restart)."""
    response = httpx.get(PROXY + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    if response.status_code != 200:
        say(f"/admin/usage: {response.status_code} {response.text}")
        return None
    body: dict[str, Any] = response.json()
    return body


def prometheus(promql: str, *, over_s: float | None = None) -> list[dict[str, Any]]:
    """The query's series now, or (`over_s`) each series' points over the last `over_s` seconds,
    one per scrape interval, as a Grafana time-series panel asks for them (query_range)."""
    if over_s is None:
        path, params = "/api/v1/query", {"query": promql}
    else:
        now = time.time()
        path = "/api/v1/query_range"
        params = {"query": promql, "start": str(now - over_s), "end": str(now), "step": str(SCRAPE_INTERVAL_S)}
    response = httpx.get(PROMETHEUS + path, params=params, timeout=10)
    body = response.json()
    if response.status_code != 200 or body["status"] != "success":
        fail(f"Prometheus query {promql}: {response.status_code} {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def numbers(result: list[dict[str, Any]]) -> list[float]:
    """The values a panel would draw: a NaN (histogram_quantile over no observations, 0/0) draws
    nothing."""
    values = [float(v) for series in result for _, v in ([series["value"]] if "value" in series else series["values"])]
    return [v for v in values if v == v]


def dashboard_queries() -> list[tuple[str, str, float | None]]:
    """(panel title, PromQL, range) for every query of the dashboard as Grafana opens it: `$team`
    at its default selection (All, i.e. its allValue), not one team; a time series over the
    dashboard's default time range (range in seconds), a stat at this instant (range None)."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    (team,) = [v for v in dashboard["templating"]["list"] if v["name"] == "team"]
    if team["current"]["value"] != ["$__all"]:
        fail(f"the dashboard's team variable does not default to All: {team['current']}")
    hours = re.fullmatch(r"now-(\d+)h", dashboard["time"]["from"])
    if hours is None or dashboard["time"]["to"] != "now":
        fail(f"the dashboard's time range is not `now-Nh` to `now`: {dashboard['time']}")
    range_s = int(hours.group(1)) * 3600
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$team", team["allValue"])
                found.append((panel["title"], grafana_to_promql(expr), None if target.get("instant") else range_s))

    walk(dashboard["panels"])
    return found


# -- the checks, in order --------------------------------------------------------------------------


def up() -> None:
    started = time.monotonic()
    compose("build")
    say(f"compose build: {time.monotonic() - started:.1f} s")
    names = services()
    compose("up", "-d", *names)
    for name in names:
        ctr = container(name)
        if inspect(ctr)["Config"].get("Healthcheck", {}).get("Test", ["NONE"])[0] == "NONE":
            time.sleep(3)  # still up a few seconds after `up`: not crash-looping
            state = inspect(ctr)["State"]
            if not state["Running"] or state["Restarting"]:
                fail(f"{name} is not running: {state}")
            ok(f"{name}: running (no healthcheck: {name} is a client)")
        else:
            took = wait_healthy(ctr, timeout_s=120)
            ok(f"{name}: healthy ({took:.1f} s after `up` returned)")
    wait_for(
        "the proxy reaches Redis (/readyz: ready, not degraded)",
        lambda: True if httpx.get(PROXY + "/readyz", timeout=5).json() == {"status": "ready"} else None,
        30,
    )
    ok(f"`{' '.join(COMPOSE)} up` brings every service up ({', '.join(names)}; without {', '.join(SKIPPED)})")


def published_on_loopback() -> None:
    for name in services():
        ports = inspect(container(name))["HostConfig"]["PortBindings"] or {}
        for port, bindings in ports.items():
            for binding in bindings:
                if binding["HostIp"] != "127.0.0.1":
                    fail(f"{name} publishes {port} on {binding['HostIp'] or 'every interface'}")
    ok("every published port is bound to 127.0.0.1")


def chat() -> None:
    reply = sdk().chat.completions.create(**CHAT)
    if not reply.choices[0].message.content:
        fail(f"empty reply: {reply}")
    chunks = list(sdk().chat.completions.create(**CHAT, stream=True))
    if not chunks:
        fail("empty stream")
    ok("a chat call (plain and streamed) through the published port 8080")


def varied_traffic() -> None:
    """Traffic that gives every dashboard panel something: rejections, upstream errors and retries,
    a budgeted key, streams."""
    sdk(RESEARCH_KEY).chat.completions.create(**{**CHAT, "model": "deepseek-chat"})
    for extra in (fault(status=500), fault(close_connection=True), fault(status=429, retry_after="0")):
        httpx.post(
            PROXY + "/v1/chat/completions",
            json=CHAT,
            timeout=30,
            headers={"Authorization": f"Bearer {PLATFORM_KEY}", **extra},
        )
    # 24 concurrent slow requests (each holding its slot 4 s, so that all overlap even on loaded
    # cores) on a key with max_parallel 16: some are refused (429)
    statuses: list[int] = []

    def slow() -> None:
        response = httpx.post(
            PROXY + "/v1/chat/completions",
            json=CHAT,
            timeout=30,
            headers={"Authorization": f"Bearer {PLATFORM_KEY}", **fault(first_byte_delay_s=4)},
        )
        statuses.append(response.status_code)

    threads = [threading.Thread(target=slow) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    if 429 not in statuses:
        fail(f"24 parallel requests on max_parallel 16 were not refused: {statuses}")
    # 6 concurrent slow requests on the research key (max_parallel 4, max_wait_ms 5000): two wait.
    # First Prometheus must have scraped research's queue series at zero: rate() sees an increase
    # only from a sample before it (a series first scraped at 2 waits shows none).
    wait_for(
        "Prometheus has research's queue series at zero, before anyone waits",
        lambda: prometheus('llm_proxy_queue_wait_seconds_count{team="research"} == 0') or None,
        60,
        interval_s=1,
    )
    waited: list[int] = []

    def research_slow() -> None:
        response = httpx.post(
            PROXY + "/v1/chat/completions",
            json={**CHAT, "model": "deepseek-chat"},
            timeout=30,
            headers={"Authorization": f"Bearer {RESEARCH_KEY}", **fault(first_byte_delay_s=1)},
        )
        waited.append(response.status_code)

    threads = [threading.Thread(target=research_slow) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    if waited != [200] * 6:
        fail(f"6 requests on max_parallel 4 with max_wait_ms 5000 were not all served: {waited}")
    queue_lines = [line for line in httpx.get(PROXY + "/metrics", timeout=10).text.splitlines() if "_queue_" in line]
    say("the proxy's queue series after them: " + ("; ".join(queue_lines[-4:]) or "none"))
    ok(f"varied traffic sent (parallel statuses: {sorted(set(statuses))}; 6 on max_parallel 4 with a queue: all 200)")


def redis_keeps_spend() -> None:
    compose("stop", "traffic")
    try:
        keeps_spend()
    finally:
        compose("start", "traffic")


def keeps_spend() -> None:
    def settled() -> dict[str, Any] | None:  # the same report twice: nothing is still being settled
        first = usage()
        time.sleep(1.5)
        return first if first is not None and usage() == first else None

    before = wait_for("the usage ledger settles", settled, 30)
    spend = before["total"]["spend_micros"] / 1e6
    if not spend:
        fail(f"no spend to keep: {before}")
    time.sleep(1.5)  # appendfsync everysec
    compose("restart", "redis")
    wait_healthy(container("redis"), 60)
    after = wait_for("/admin/usage after the restart", usage, 30)
    if after != before:
        fail(f"the day's usage changed across `restart redis`:\nbefore {before}\nafter  {after}")
    wait_for("a chat after the Redis restart", chat_ok, 30)
    appendonly = run(["docker", "exec", container("redis"), "redis-cli", "config", "get", "appendonly"]).stdout.split()
    if appendonly != ["appendonly", "yes"]:
        fail(f"Redis runs without AOF: {appendonly}")
    ok(f"Redis keeps the day's spend (${spend:.6f}) across `compose restart redis` (AOF on a volume)")


def prometheus_checks() -> None:
    def proxy_target_up() -> bool | None:
        body = httpx.get(PROMETHEUS + "/api/v1/targets", timeout=10).json()
        targets = [t for t in body["data"]["activeTargets"] if t["labels"].get("job") == "llm-proxy"]
        return True if targets and all(t["health"] == "up" for t in targets) else None

    wait_for("Prometheus scrapes the proxy (target up)", proxy_target_up, 60)
    ok("Prometheus scrapes proxy:8080 (target health up)")

    wait_for("llm_proxy_requests_total in Prometheus", lambda: prometheus("llm_proxy_requests_total") or None, 60)
    ok("Prometheus has llm_proxy_requests_total after traffic")

    expected = alert_rules()

    def rules_loaded() -> list[dict[str, Any]] | None:
        groups = httpx.get(PROMETHEUS + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if len(rules) == len(expected) and all(r["health"] == "ok" for r in rules) else None

    rules = rules_loaded() or wait_for("every alert rule loaded and healthy", rules_loaded, 60)
    names = {rule["name"] for rule in rules}
    missing = {rule["alert"] for rule in expected} - names
    if missing:
        fail(f"alert rules not loaded: {missing}")
    ok(f"Prometheus loaded all {len(rules)} alert rules (health ok)")

    queries = dashboard_queries()
    pending = {f"{title} | {promql}": (promql, over_s) for title, promql, over_s in queries}

    def all_answered() -> bool | None:  # rate() over [1m] needs two scrapes (15 s apart) after traffic
        for key, (promql, over_s) in list(pending.items()):
            if numbers(prometheus(promql, over_s=over_s)):
                del pending[key]
        return True if not pending else None

    try:
        wait_for("every dashboard query returns data", all_answered, 120, interval_s=5)
    except Exception:
        say("no data for:\n  " + "\n  ".join(pending))
        raise
    ok(
        f"all {len(queries)} Grafana dashboard queries (team: All) return numbers from the stack's Prometheus "
        "(time series over the dashboard's time range, stats now)"
    )


def moved_upstream() -> None:
    """The mock upstream recreated at a new address is served again within a few seconds."""
    network = f"{PROJECT}_default"
    old_ctr = container("mock-upstream")
    old_ip = inspect(old_ctr)["NetworkSettings"]["Networks"][network]["IPAddress"]
    wait_for("a chat before the move", chat_ok, 10)
    compose("rm", "-f", "-s", "mock-upstream")
    # Docker hands out the lowest free address: a container started now takes the old one, so the
    # recreated upstream gets a new address.
    holder = f"{PROJECT}-address-holder"
    run(["docker", "rm", "-f", holder], check=False)
    run(
        [
            "docker",
            "run",
            "-d",
            "--name",
            holder,
            "--network",
            network,
            "--entrypoint",
            "sleep",
            "redis:7-alpine",
            "120",
        ]
    )
    try:
        compose("up", "-d", "--no-deps", "mock-upstream")
        new_ctr = container("mock-upstream")
        new_ip = inspect(new_ctr)["NetworkSettings"]["Networks"][network]["IPAddress"]
        if new_ip == old_ip:
            fail(f"the recreated upstream kept its address {old_ip}: the check would prove nothing")
        wait_healthy(new_ctr, 60)
        started = time.monotonic()
        statuses: list[int] = []

        def served() -> bool | None:
            response = httpx.post(
                PROXY + "/v1/chat/completions",
                json=CHAT,
                timeout=5,
                headers={"Authorization": f"Bearer {PLATFORM_KEY}"},
            )
            statuses.append(response.status_code)
            return True if response.status_code == 200 else None

        try:  # 502s throughout: the proxy still connects to the old address (its DNS cache)
            wait_for(f"the upstream moved {old_ip} -> {new_ip} served again", served, 30, interval_s=0.2)
        finally:
            say(f"statuses after the move: {statuses[:10]}{'...' if len(statuses) > 10 else ''}")
        took = time.monotonic() - started
        if took > MOVED_UPSTREAM_LIMIT_S:
            fail(f"the upstream moved {old_ip} -> {new_ip} was served again only after {took:.1f} s")
        ok(f"upstream moved {old_ip} -> {new_ip}: served again after {took:.1f} s")
    finally:
        run(["docker", "rm", "-f", holder], check=False)


def stop_proxy_mid_stream() -> None:
    proxy = container("proxy")
    grace = inspect(proxy)["Config"].get("StopTimeout")
    # ~13 s: longer than Compose's default stop timeout (10 s), so only stop_grace_period lets it end
    stream = sdk(**fault(chunk_delay_s=1.0, chunks=13)).chat.completions.create(**CHAT, stream=True)
    received: list[str] = []
    outcome: dict[str, Any] = {}

    def read() -> None:
        try:
            for chunk in stream:
                received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            outcome["done"] = True  # the SDK stops at `data: [DONE]`
        except Exception as exc:
            outcome["error"] = exc

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_for("the stream's first chunks", lambda: True if len(received) >= 2 else None, 15, interval_s=0.1)
        started = time.monotonic()
        compose("stop", "proxy", timeout=120)
        took = time.monotonic() - started
        reader.join(30)
        state = inspect(proxy)["State"]
        if outcome.get("done") is not True:
            fail(
                f"the stream in flight did not finish with [DONE] on `stop proxy` after {took:.1f} s: "
                f"{outcome}, {len(received)} chunks"
            )
        if state["ExitCode"] != 0 or state["OOMKilled"]:
            fail(
                f"the proxy exited {state['ExitCode']} on `stop proxy` after {took:.1f} s (stop_grace_period {grace} s)"
            )
        ok(
            f"`stop proxy` mid-stream: the stream finished with [DONE] ({len(received)} chunks), proxy exit 0 "
            f"after {took:.1f} s (stop_grace_period {grace} s)"
        )
    finally:
        reader.join(30)
        compose("start", "proxy")
        wait_healthy(proxy, 60)


def others_stop_fast() -> None:
    times = []
    for name in services():
        if name == "proxy":
            continue
        ctr = container(name)
        started = time.monotonic()
        compose("stop", "-t", "20", name, timeout=60)
        took = time.monotonic() - started
        code = inspect(ctr)["State"]["ExitCode"]
        times.append(f"{name} {took:.1f} s (exit {code})")
        if took >= STOP_LIMIT_S or code == 137:
            fail(f"{name} did not stop on SIGTERM in under {STOP_LIMIT_S:.0f} s: {took:.1f} s, exit {code}")
    ok("every other service stops on SIGTERM in under 5 s: " + ", ".join(times))


def checks() -> None:
    say(f"compose: {' '.join(COMPOSE)} ({run([*COMPOSE, 'version'], check=False).stdout.splitlines()[0]})")
    compose("down", "-v", "--remove-orphans", check=False)
    failures: list[str] = []
    try:
        up()
        chat()
        # Each of these leaves the stack whole when it fails, so the others still run and report.
        for check in (
            published_on_loopback,
            varied_traffic,
            redis_keeps_spend,
            prometheus_checks,
            stop_proxy_mid_stream,
            moved_upstream,
            others_stop_fast,
        ):
            try:
                check()
            except CheckFailed as exc:
                failures.append(f"{check.__name__}: {exc}")
                print(f"FAIL (continuing): {check.__name__}: {exc}", file=sys.stderr, flush=True)
        if failures:
            fail(f"{len(failures)} compose checks failed:\n" + "\n".join(failures))
    except Exception:
        for name in services():
            logs = compose("logs", "--no-color", "--tail", "30", name, check=False)
            print(f"--- {name} logs\n{logs.stdout}{logs.stderr}", file=sys.stderr)
        raise
    finally:
        if os.environ.get("LLM_PROXY_CI_KEEP_STACK") != "1":
            compose("down", "-v", "--remove-orphans", check=False)


if __name__ == "__main__":
    main(checks)
