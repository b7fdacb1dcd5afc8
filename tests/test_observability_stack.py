"""The observability stack against a real proxy: every metric of proxy/metrics.py after a scripted
set of requests, with counts checked against the mock upstream and the ledger; then a real
Prometheus scraping that proxy evaluates every dashboard query and alert rule.

Prometheus and promtool come from Debian's `prometheus` package. Without them these tests skip,
unless LLM_PROXY_REQUIRE_PROMETHEUS=1 (set by .ci/run): then they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.configs import ADMIN_KEY, KEYS, make_config
from tests.support.metrics import samples
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "llm-proxy.json"
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
# A chat above costs 11 µ$ and reserves 14 µ$ (see test_budgets_e2e): bob's 30 µ$ budget admits two
# requests (22 µ$, past the 0.5 alert ratio on the second), then refuses the third (22 + 14 > 30).
BOB_BUDGET_USD, COST_USD = 0.00003, 0.000011
TEAM = "platform"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$team": TEAM}

# proxy/metrics.py, as exposed (counters with _total): the public contract.
METRICS = {
    "llm_proxy_requests_total": {"team", "key", "model", "status", "endpoint"},
    "llm_proxy_request_duration_seconds": {"team", "model", "stream"},
    "llm_proxy_time_to_first_token_seconds": {"team", "model"},
    "llm_proxy_upstream_duration_seconds": {"upstream", "model"},
    "llm_proxy_overhead_seconds": set(),
    "llm_proxy_tokens_total": {"team", "key", "model", "kind"},
    "llm_proxy_spend_usd_total": {"team", "key", "model"},
    "llm_proxy_rejections_total": {"team", "key", "reason", "shadow"},
    "llm_proxy_budget_spent_usd": {"scope", "name"},
    "llm_proxy_budget_limit_usd": {"scope", "name"},
    "llm_proxy_budget_alert": {"scope", "name"},
    "llm_proxy_inflight_requests": {"team"},
    "llm_proxy_upstream_retries_total": {"upstream", "reason"},
    "llm_proxy_upstream_errors_total": {"upstream", "kind"},
    "llm_proxy_store_errors_total": {"op"},
    "llm_proxy_upstream_quota_remaining": {"upstream", "model", "limit"},
    "llm_proxy_queue_wait_seconds": {"team"},
    "llm_proxy_queue_depth": {"team"},
}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def prometheus_required() -> bool:
    return os.environ.get("LLM_PROXY_REQUIRE_PROMETHEUS", "") not in ("", "0")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"`{name}` is not installed (Debian: apt-get install prometheus)"
        if prometheus_required():
            pytest.fail(f"LLM_PROXY_REQUIRE_PROMETHEUS is set but {message}")
        pytest.skip(message)
    return path


# -- the scripted traffic -------------------------------------------------------------------------


def post(server, body=CHAT, key="alice", token=None):
    return httpx.post(
        server.base_url + "/chat/completions",
        json=body,
        timeout=10,
        headers={"Authorization": f"Bearer {token or KEYS[key]}"},
    )


def stream(server, key="alice"):
    with httpx.stream(
        "POST",
        server.base_url + "/chat/completions",
        json={**CHAT, "stream": True},
        timeout=10,
        headers={"Authorization": f"Bearer {KEYS[key]}"},
    ) as response:
        body = response.read().decode()
    assert response.status_code == 200 and body.rstrip().endswith("data: [DONE]")
    return response


def total(found, sample: str, /, **labels: str) -> float:
    return sum(value for have, value in found[sample] if all(have.get(k) == v for k, v in labels.items()))


def families(text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))


def settle_journal(server) -> None:
    limiter = server.app.state.limiter
    deadline = time.monotonic() + 10
    while limiter.journal:
        assert time.monotonic() < deadline, f"spend journal not flushed: {len(limiter.journal)} left"
        time.sleep(0.05)


@pytest.fixture
def own_redis():
    """A Redis of this test's own: the traffic kills and restarts it (set up before the proxy, so it
    outlives the proxy's shutdown flush). Persistent, as deployed (AOF): the budget gauges are
    refreshed from Redis every 15 s, and a restart that wiped the day's spend would zero bob's alert
    whenever a refresh fell between the restart and the scrape (it did, once in CI)."""
    server = RedisServer(persistent=True)
    yield server
    server.stop()


@pytest.fixture
def traffic(own_redis, mock_upstream, start_proxy):
    """Run requests that touch every metric; return the server and what each source reported."""

    def patch(data):
        data["store"] = {"redis_url": own_redis.url, "on_redis_error": "allow", "timeout_ms": 100}
        data["budget_alert_ratio"] = 0.5
        data["teams"]["platform"]["daily_budget_usd"] = "1"
        data["teams"]["research"]["daily_budget_usd"] = "1"
        data["keys"]["bob"]["daily_budget_usd"] = str(BOB_BUDGET_USD)
        data["keys"]["carol"]["limits"] = {"rpm": 1}
        data["upstreams"]["mock"]["limits"] = {"rpm": 1000, "tpm": 1_000_000}  # never reached here
        data["keys"]["alice"]["limits"] = {"max_parallel": 1, "max_wait_ms": 5000}  # one request waits

    server, _ = start_proxy(make_config(mock_upstream.url, patch=patch))

    def settled(status: int) -> int:
        """Alice's one slot is released when her request settles, just after its last byte: her
        next request would otherwise wait for it, and count as a queue wait (it did, on loaded cores)."""
        server.wait_settled()
        return status

    statuses = {"plain": settled(post(server).status_code), "stream": settled(stream(server).status_code)}
    mock_upstream.add_faults([{"cached_tokens": 1}])
    statuses["cached"] = settled(post(server).status_code)
    mock_upstream.add_faults([{"status": 503, "retry_after_ms": "5"}])
    statuses["retried"] = settled(post(server).status_code)
    statuses["bob"] = [post(server, key="bob").status_code for _ in range(3)]
    statuses["carol"] = [post(server, key="carol").status_code for _ in range(2)]
    statuses["queued"] = queued_pair(server, mock_upstream)
    statuses["auth"] = post(server, token="sk-proxy-nobody-0000").status_code
    statuses["model"] = post(server, {**CHAT, "model": "no-such-model"}).status_code
    assert statuses == {
        "plain": 200,
        "stream": 200,
        "cached": 200,
        "retried": 200,
        "bob": [200, 200, 429],
        "carol": [200, 429],
        "queued": [200, 200],
        "auth": 401,
        "model": 404,
    }
    server.wait_settled()
    before_outage = {
        "metrics": httpx.get(server.url + "/metrics", timeout=10).text,
        "usage": httpx.get(
            server.url + "/admin/usage", timeout=10, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ).json(),
        "mock": mock_upstream.stats(),
    }
    own_redis.kill()  # on_redis_error=allow: served by the fallback limiter, counted as a store error
    assert post(server).status_code == 200
    own_redis.start()
    settle_journal(server)
    after_outage = httpx.get(server.url + "/metrics", timeout=10).text
    return server, before_outage, after_outage


def queued_pair(server, mock_upstream) -> list[int]:
    """A slow request of alice's holds her one parallel slot; the next waits for it, then is served.
    The holder's 2 s leave the waiter time to arrive on loaded cores and still wait over 0.2 s (with
    0.5 s, it once waited 0.14 s)."""
    mock_upstream.add_faults([{"first_byte_delay_s": 2.0}])
    seen = len(mock_upstream.requests)
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(post, server)
        deadline = time.monotonic() + 5
        while len(mock_upstream.requests) == seen:
            assert time.monotonic() < deadline, "the holder did not reach the upstream"
            time.sleep(0.005)
        waiter = post(server)
        return [holder.result().status_code, waiter.status_code]


# -- /metrics -------------------------------------------------------------------------------------


def test_every_metric_is_exposed_with_its_labels(traffic):
    _, _, after = traffic
    assert families(after) >= set(METRICS)
    found = samples(after)
    for name, labels in METRICS.items():
        names = [name + suffix for suffix in HISTOGRAM_SUFFIXES] if name.endswith("_seconds") else [name]
        series = [have for sample in names for have, _ in found[sample]]
        assert series, f"{name}: no samples after the scripted traffic"
        for have in series:
            assert set(have) - {"le"} == labels, f"{name}: labels {sorted(have)}, expected {sorted(labels)}"


def test_counts_match_the_traffic_the_mock_and_the_ledger(traffic):
    _, before, after = traffic
    found = samples(before["metrics"])
    requests = "llm_proxy_requests_total"
    assert total(found, requests, team="platform", key="alice", model="chat-model", status="200") == 6
    assert total(found, requests, key="alice", status="404") == 1
    assert total(found, requests, key="bob", status="200") == 2
    assert total(found, requests, key="bob", status="429") == 1
    assert total(found, requests, team="research", key="carol", status="200") == 1
    assert total(found, requests, key="carol", status="429") == 1
    assert total(found, requests, team="", key="", status="401") == 1
    assert total(found, requests) == 13

    rejections = {
        (labels["team"], labels["key"], labels["reason"]): value
        for labels, value in found["llm_proxy_rejections_total"]
    }
    assert rejections == {
        ("platform", "bob", "budget"): 1,
        ("research", "carol", "rpm"): 1,
        ("", "", "auth"): 1,
        ("platform", "alice", "model"): 1,
    }

    mock = before["mock"]
    assert mock["requests"] == 10  # 9 served + the 503 that was retried
    for kind in ("prompt", "completion", "cached"):
        assert total(found, "llm_proxy_tokens_total", kind=kind) == mock[f"{kind}_tokens"] > 0, kind
    ledger = before["usage"]["total"]
    assert total(found, "llm_proxy_tokens_total", kind="prompt") == ledger["prompt_tokens"]
    assert total(found, "llm_proxy_tokens_total", kind="completion") == ledger["completion_tokens"]
    spend = total(found, "llm_proxy_spend_usd_total")
    assert spend == pytest.approx(ledger["spend_micros"] / 1e6, rel=1e-9, abs=1e-12)
    bob_ledger = before["usage"]["teams"]["platform"]["keys"]["bob"]["spend_micros"]
    assert total(found, "llm_proxy_spend_usd_total", key="bob") == pytest.approx(bob_ledger / 1e6)
    assert bob_ledger == round(2 * COST_USD * 1e6)

    assert total(found, "llm_proxy_budget_spent_usd", scope="key", name="bob") == pytest.approx(2 * COST_USD)
    assert total(found, "llm_proxy_budget_limit_usd", scope="key", name="bob") == pytest.approx(BOB_BUDGET_USD)
    assert total(found, "llm_proxy_budget_limit_usd", scope="team", name="platform") == 1
    assert total(found, "llm_proxy_budget_alert", scope="key", name="bob") == 1
    assert total(found, "llm_proxy_budget_alert", scope="team", name="platform") == 0
    assert {labels["team"]: value for labels, value in found["llm_proxy_inflight_requests"]} == {
        "platform": 0,
        "research": 0,
    }

    admitted = 9  # every 200: 6 alice, 2 bob, 1 carol
    assert total(found, "llm_proxy_request_duration_seconds_count") == admitted
    assert total(found, "llm_proxy_request_duration_seconds_count", stream="true") == 1
    assert total(found, "llm_proxy_time_to_first_token_seconds_count", team="platform") >= 1
    assert total(found, "llm_proxy_upstream_duration_seconds_count", upstream="mock", model="gpt-4o-mini") == admitted
    assert total(found, "llm_proxy_overhead_seconds_count") == admitted
    assert total(found, "llm_proxy_upstream_retries_total", upstream="mock") == 1
    assert total(found, "llm_proxy_upstream_errors_total", upstream="mock") == 1
    store_errors = {labels["op"]: value for labels, value in found["llm_proxy_store_errors_total"]}
    assert set(store_errors) == {"admit", "settle", "flush", "renew", "hold", "holds"}  # present from the start,
    # so increase() sees the first error; none on the request path. The holds poll runs 4 times a
    # second in the background: on loaded cores one may miss the store's timeout, and is counted
    assert {op: store_errors[op] for op in ("admit", "settle", "flush", "renew", "hold")} == dict.fromkeys(
        ("admit", "settle", "flush", "renew", "hold"), 0
    )

    during = samples(after)
    assert total(during, "llm_proxy_store_errors_total", op="admit") >= 1
    assert total(during, requests, key="alice", status="200") == 7
    assert total(found, "llm_proxy_queue_wait_seconds_count", team="platform") == 1  # the waiter
    assert 0.2 < total(found, "llm_proxy_queue_wait_seconds_sum", team="platform") < 5
    assert total(found, "llm_proxy_queue_depth", team="platform") == 0


# -- Prometheus and promtool ----------------------------------------------------------------------


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of the dashboard, rows' nested panels included."""
    found = []

    def walk(panels):
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))

    walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"])
    return found


def grafana_to_promql(expr: str) -> str:
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):  # $__range before $__rate...
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


class Prometheus:
    """A real Prometheus on 127.0.0.1:<free port> scraping one target every second."""

    def __init__(self, executable: str, workdir: Path, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shutil.copy(PROMETHEUS_DIR / "alerts.yml", workdir / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {"job_name": "llm-proxy", "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [
                    executable,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )

    def query(self, promql: str) -> dict:
        response = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
        return body["data"]

    def wait_for_scrapes(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.popen.poll() is None, f"prometheus exited:\n{self.log_path.read_text()}"
            try:
                result = self.query('count_over_time(up{job="llm-proxy"}[1m]) and up{job="llm-proxy"} == 1')["result"]
                if result and float(result[0]["value"][1]) >= count:
                    return
            except (httpx.TransportError, json.JSONDecodeError, AssertionError):
                pass  # not listening, or not ready yet
            assert time.monotonic() < deadline, f"no {count} scrapes in {timeout_s}s:\n{self.log_path.read_text()}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)


@pytest.fixture
def prometheus_executable() -> str:
    return binary("prometheus")


def test_prometheus_evaluates_every_dashboard_query_and_alert_rule(prometheus_executable, traffic, tmp_path):
    server, _, _ = traffic
    prometheus = Prometheus(prometheus_executable, tmp_path, f"127.0.0.1:{server.port}")
    try:
        prometheus.wait_for_scrapes(3)
        names = prometheus.query('group by (__name__) ({__name__=~"llm_proxy_.*"})')["result"]
        scraped = {series["metric"]["__name__"] for series in names}
        for name in METRICS:
            expected = {name + s for s in HISTOGRAM_SUFFIXES} if name.endswith("_seconds") else {name}
            assert expected <= scraped, f"{name} not in Prometheus"

        exprs = dashboard_exprs()
        assert len(exprs) >= 15
        for title, expr in exprs:
            promql = grafana_to_promql(expr)
            assert prometheus.query(promql)["result"], f"panel {title!r}: no data for {promql}"

        for rule in alert_rules():
            prometheus.query(rule["expr"])  # status success, i.e. valid PromQL over these metrics
        ratio = next(r for r in alert_rules() if r["alert"] == "LLMProxyBudgetAlertRatio")["expr"]
        assert {(s["metric"]["scope"], s["metric"]["name"]) for s in prometheus.query(ratio)["result"]} == {
            ("key", "bob")
        }
        redis = next(r for r in alert_rules() if r["alert"] == "LLMProxyRedisErrors")["expr"]
        assert "admit" in {s["metric"]["op"] for s in prometheus.query(redis)["result"]}

        deadline = time.monotonic() + 10
        while True:  # the rule manager loaded and evaluated every rule without errors
            groups = httpx.get(prometheus.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if len(rules) == len(alert_rules()) and all(rule["health"] == "ok" for rule in rules):
                break
            assert time.monotonic() < deadline, f"rules not healthy: {rules}"
            time.sleep(0.2)
        pending = {alert["metric"]["alertname"] for alert in prometheus.query("ALERTS")["result"]}
        assert {"LLMProxyBudgetAlertRatio", "LLMProxyRedisErrors"} <= pending
    finally:
        prometheus.stop()


@pytest.mark.parametrize(
    "args",
    [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]],
    ids=lambda args: " ".join(args[:2]),
)
def test_promtool(args):
    result = subprocess.run([binary("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
