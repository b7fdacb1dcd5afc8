"""Budgets through the whole proxy: real Redis, uvicorn on a port, the mock upstream, the SDK."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest

from proxy.limits.redis_store import RedisStore
from tests.support.clock import Clock
from tests.support.configs import ADMIN_KEY, KEYS, UPSTREAM_KEY, config_dict, make_config
from tests.support.errors import INVALID, WRONG_KEY, clocked, error_reply, openai_error
from tests.support.redis_server import RedisServer

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
# the proxy estimates "hi" as 8 prompt tokens (chars/4 + message overhead); the mock reports 1 prompt
# token and min(16, max_tokens) completion tokens. At $0.27 in and $1.10 out per Mtok, max_tokens=10
# reserves ceil(8 × 0.27 + 10 × 1.10) = 14 µ$ and costs round(0.27 + 11) = 11 µ$.
RESERVED, COST = 14, 11
NUMBERS_WITHOUT_BUDGET = [
    "spend_usd",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
]


def post(server, body=CHAT, key="alice", headers=None, endpoint="/chat/completions"):
    return httpx.post(
        server.base_url + endpoint,
        json=body,
        headers={"Authorization": f"Bearer {KEYS[key]}", **(headers or {})},
        timeout=10,
    )


def admin_get(server, path, key=ADMIN_KEY, **params):
    server.wait_settled()
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.get(server.url + path, params=params, headers=headers, timeout=10)


def next_midnight_utc():
    """When today's budget ends in the test configs' `budget_timezone` (UTC), as a refusal writes it."""
    return (datetime.now(UTC).date() + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z")


def budget(key_usd=None, team_usd=None, **extra):
    def patch(data):
        if key_usd is not None:
            data["keys"]["alice"]["daily_budget_usd"] = key_usd
        if team_usd is not None:
            data["teams"]["platform"]["daily_budget_usd"] = team_usd
        data.update(extra)

    return patch


@pytest.fixture
def on_redis(mock_upstream, start_proxy, redis_url):
    def start(patch, clock=None):
        config = make_config(mock_upstream.url, redis_url=redis_url, patch=patch)
        store = RedisStore.from_url(redis_url, clock_us=clock) if clock else None
        server, recorder = start_proxy(config, store=store)
        server.recorder = recorder
        return server

    return start


def test_budget_cut_off_is_exact_and_not_retried(on_redis):
    server = on_redis(budget(key_usd="0.0001"))  # 100 µ$
    statuses = [post(server).status_code for _ in range(12)]
    assert statuses == [200] * 8 + [429] * 4  # 8 × 11 µ$ = 88 spent; 88 + 14 reserved > 100
    midnights = {next_midnight_utc()}
    refused = post(server)
    midnights.add(next_midnight_utc())
    expected = openai_error(
        clocked("Key `alice` has spent $0.000088 of its $0.0001 daily budget; it resets at {instant}."),
        "insufficient_quota",
        "insufficient_quota",
    )
    assert error_reply(refused) == (429, expected)
    assert refused.json()["error"]["message"][-len("2026-12-02T00:00:00Z.") : -1] in midnights
    assert refused.headers["x-should-retry"] == "false"
    before = len(server.recorder.outcomes)
    with (
        openai.OpenAI(base_url=server.base_url, api_key=KEYS["alice"], max_retries=3) as sdk,
        pytest.raises(openai.RateLimitError) as caught,
    ):
        sdk.chat.completions.create(**CHAT)
    assert caught.value.body == expected["error"]
    assert len(server.recorder.outcomes) == before + 1, "the SDK retried a budget refusal"
    usage = admin_get(server, "/admin/usage").json()
    assert usage["teams"]["platform"]["keys"]["alice"]["spend_micros"] == 8 * COST
    assert usage["teams"]["platform"]["keys"]["alice"]["remaining_usd"] == pytest.approx(0.000012)


def test_failed_upstream_call_costs_nothing(on_redis, mock_upstream):
    server = on_redis(budget(key_usd="0.0001"))
    mock_upstream.add_faults([{"status": 500, "retry_after_ms": "1"}] * 3)
    assert post(server).status_code == 502
    usage = admin_get(server, "/admin/usage").json()["teams"]["platform"]
    assert usage["spend_micros"] == 0 and usage["requests"] == 1
    assert [post(server).status_code for _ in range(9)] == [200] * 8 + [429]  # the reservation came back


class WebhookReceiver:
    """Collects POSTed JSON; answers 500 to the first `fail_first` posts."""

    def __init__(self, fail_first=0):
        self.events, self.attempts, self.fail_first = [], 0, fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.attempts += 1
                if receiver.attempts <= receiver.fail_first:
                    self.send_response(500)
                else:
                    receiver.events.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_alert_threshold_logs_once_sets_gauge_and_posts_webhook(on_redis, caplog):
    receiver = WebhookReceiver(fail_first=1)
    try:
        server = on_redis(budget(key_usd="0.0001", budget_alert_ratio=0.5, alert_webhook_url=receiver.url))
        with caplog.at_level("WARNING", logger="proxy.budgets.watch"):
            for _ in range(8):
                assert post(server).status_code == 200
            deadline = time.monotonic() + 5
            while not receiver.events:
                assert time.monotonic() < deadline, "webhook never delivered"
                time.sleep(0.02)
        time.sleep(0.3)
        assert receiver.attempts == 2  # one failure, retried once
        assert len(receiver.events) == 1
        event = receiver.events[0]
        assert (event["scope"], event["name"], event["budget_usd"]) == ("key", "alice", "0.000100")
        assert event["spent_usd"] == "0.000055"  # the 5th request (5 × 11 µ$) crossed 50 µ$
        assert not any(secret in json.dumps(event) for secret in (*KEYS.values(), UPSTREAM_KEY, ADMIN_KEY))
        alerts = [r for r in caplog.records if "budget alert" in r.getMessage()]
        assert len(alerts) == 1 and "key 'alice'" in alerts[0].getMessage()
        metrics = httpx.get(server.url + "/metrics").text
        assert 'llm_proxy_budget_alert{name="alice",scope="key"} 1.0' in metrics
        assert 'llm_proxy_budget_spent_usd{name="alice",scope="key"} 8.8e-05' in metrics
        assert 'llm_proxy_budget_limit_usd{name="alice",scope="key"} 0.0001' in metrics
    finally:
        receiver.close()


def test_admin_api_auth_and_content(on_redis):
    server = on_redis(budget(key_usd="1", team_usd="10"))
    post(server, headers={"x-proxy-tags": "role=security_auditor,workflow=nightly"})
    assert post(server, {**CHAT, "metadata": {"role": "data_analyst"}}, key="bob").status_code == 200
    assert (
        post(
            server,
            {"model": "text-model", "prompt": "hello there", "max_tokens": 4, "user": "u-42"},
            endpoint="/completions",
        ).status_code
        == 200
    )
    post(server, {**CHAT, "model": "no-such"})  # refused: costs nothing, books nothing
    no_key = "The admin API needs the admin key as `Authorization: Bearer ...`."
    for key, status, message, code in (
        (None, 401, no_key, "invalid_api_key"),
        ("sk-unknown", 401, WRONG_KEY, "invalid_api_key"),
        (KEYS["alice"], 403, "This key may not use the admin API.", "admin_key_required"),
    ):
        response = admin_get(server, "/admin/usage", key=key)
        assert error_reply(response) == (status, openai_error(message, INVALID, code))
    assert error_reply(admin_get(server, "/admin/usage", date="2024-13-45")) == (
        400,
        openai_error("`date` is not a calendar date.", INVALID, None, "date"),
    )
    assert error_reply(admin_get(server, "/admin/usage", date="yesterday")) == (
        400,
        openai_error("`date` must be YYYY-MM-DD.", INVALID, None, "date"),
    )
    usage = admin_get(server, "/admin/usage").json()
    platform = usage["teams"]["platform"]
    costs = [o.cost_micros for o in server.recorder.outcomes if o.ticket]
    assert platform["spend_micros"] == sum(costs) == usage["total"]["spend_micros"]
    assert platform["requests"] == 3 and platform["budget_usd"] == 10.0
    alice = platform["keys"]["alice"]
    assert set(alice["models"]) == {"chat-model", "text-model"}
    assert alice["models"]["text-model"]["completion_tokens"] == 4
    assert set(platform["tags"]) == {"role=security_auditor", "workflow=nightly", "role=data_analyst", "user=u-42"}
    assert platform["tags"]["role=security_auditor"]["requests"] == 1
    assert usage["teams"]["research"]["keys"]["carol"]["requests"] == 0
    keys = admin_get(server, "/admin/keys")
    assert keys.status_code == 200 and keys.json()["keys"]["bob"]["models"] == ["chat-model"]
    text = keys.text + json.dumps(usage)
    for secret in KEYS.values():
        assert secret not in text and hashlib.sha256(secret.encode()).hexdigest() not in text


def test_usage_cli_table_and_json(on_redis, tmp_path, redis_url):
    server = on_redis(budget(key_usd="1"))
    post(server, headers={"x-proxy-tags": "role=security_auditor"})
    env = {**os.environ, "LLM_PROXY_ADMIN_KEY": ADMIN_KEY}
    by_tag = subprocess.run(
        [sys.executable, "-m", "proxy", "usage", "--url", server.url, "--by", "tag"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert by_tag.returncode == 0, by_tag.stderr
    assert "role=security_auditor" in by_tag.stdout and "0.000011" in by_tag.stdout
    config_path = tmp_path / "config.json"  # JSON is YAML
    data = config_dict("http://127.0.0.1:9/v1", redis_url=redis_url)
    budget(key_usd="1")(data)
    config_path.write_text(json.dumps(data))
    from_store = subprocess.run(
        [sys.executable, "-m", "proxy", "usage", "--config", str(config_path), "--json", "--by", "key"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert from_store.returncode == 0, from_store.stderr
    report = json.loads(from_store.stdout)
    assert report["teams"]["platform"]["keys"]["alice"]["spend_micros"] == COST
    by_key = subprocess.run(
        [sys.executable, "-m", "proxy", "usage", "--config", str(config_path), "--by", "key"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "alice" in by_key.stdout and "1.000000" in by_key.stdout  # the key's budget column
    post(server, {**CHAT, "user": "ann"})
    server.wait_settled()
    for source in (["--url", server.url], ["--config", str(config_path)]):
        by_end_user = subprocess.run(
            [sys.executable, "-m", "proxy", "usage", *source, "--by", "end_user", "--window", "month"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert by_end_user.returncode == 0, by_end_user.stderr
        month = datetime.now(ZoneInfo("UTC")).strftime("%Y-%m")
        lines = by_end_user.stdout.splitlines()
        assert lines[0] == f"usage in {month} (USD), by end_user"
        assert lines[1].split() == ["team", "end_user", *NUMBERS_WITHOUT_BUDGET]
        assert lines[2].split()[:4] == ["platform", "ann", "0.000011", "1"]


def test_day_rollover_in_the_budget_timezone(on_redis):
    zone = ZoneInfo("America/New_York")
    almost_midnight = datetime(2026, 3, 7, 23, 59, 50, tzinfo=zone)  # the night before DST starts
    clock = Clock(int(almost_midnight.timestamp() * 1_000_000))
    server = on_redis(budget(key_usd="0.00003", budget_timezone="America/New_York"), clock=clock)
    assert [post(server).status_code for _ in range(3)] == [200, 200, 429]
    clock.advance(9)
    refused = post(server)
    assert refused.status_code == 429
    assert refused.json()["error"]["message"] == (  # New York's midnight in EST (UTC-5), in UTC
        "Key `alice` has spent $0.000022 of its $0.00003 daily budget; it resets at 2026-03-08T05:00:00Z."
    )
    clock.advance(1)  # 2026-03-08 00:00 in New York
    assert [post(server).status_code for _ in range(2)] == [200, 200]
    refused = post(server)
    assert refused.status_code == 429
    assert refused.json()["error"]["message"] == (  # a 23-hour day: the next midnight is in EDT (UTC-4)
        "Key `alice` has spent $0.000022 of its $0.00003 daily budget; it resets at 2026-03-09T04:00:00Z."
    )
    before = admin_get(server, "/admin/usage", date="2026-03-07").json()["teams"]["platform"]["keys"]["alice"]
    after = admin_get(server, "/admin/usage", date="2026-03-08").json()["teams"]["platform"]["keys"]["alice"]
    assert before["spend_micros"] == after["spend_micros"] == 2 * COST
    assert admin_get(server, "/admin/usage").json()["date"] == "2026-03-08"


def test_nothing_is_lost_when_redis_dies_mid_load(mock_upstream, start_proxy):
    redis = RedisServer(persistent=True)
    try:

        def patch(data):
            data["store"] = {"redis_url": redis.url, "on_redis_error": "allow", "timeout_ms": 100}

        server, recorder = start_proxy(make_config(mock_upstream.url, patch=patch))
        stop = threading.Event()
        statuses = []

        def load(key):
            with httpx.Client(timeout=10) as http:
                while not stop.is_set():
                    body = {**CHAT, "stream": len(statuses) % 2 == 0}
                    response = http.post(
                        server.base_url + "/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {KEYS[key]}"},
                    )
                    statuses.append(response.status_code)

        threads = [threading.Thread(target=load, args=(key,)) for key in ("alice", "bob", "carol")]
        for thread in threads:
            thread.start()
        time.sleep(0.7)
        redis.kill()
        time.sleep(1.0)
        redis.start()
        time.sleep(0.7)
        stop.set()
        for thread in threads:
            thread.join(10)
        limiter = server.app.state.limiter
        deadline = time.monotonic() + 10
        while limiter.journal:
            assert time.monotonic() < deadline, f"journal not flushed: {len(limiter.journal)} left"
            time.sleep(0.05)
        assert set(statuses) == {200}, "allow mode: every request is served through the outage"
        reported = mock_upstream.stats()
        usage = admin_get(server, "/admin/usage").json()["total"]
        assert usage["requests"] == len(statuses)
        assert usage["prompt_tokens"] == reported["prompt_tokens"]
        assert usage["completion_tokens"] == reported["completion_tokens"]
        assert usage["spend_micros"] == sum(o.cost_micros for o in recorder.outcomes)
    finally:
        redis.stop()


def test_reservation_covers_the_larger_of_max_tokens_and_max_completion_tokens(on_redis, mock_upstream):
    """An upstream may honour `max_tokens` over `max_completion_tokens`: a request whose
    max_tokens=1000 cannot fit the budget is refused, however small its max_completion_tokens."""
    server = on_redis(budget(key_usd="0.0001"))  # 100 µ$; max_tokens=1000 reserves ~1,102 µ$
    both = {**CHAT, "max_tokens": 1000, "max_completion_tokens": 1}
    nothing_spent = (
        429,
        openai_error(
            clocked("Key `alice` has spent $0.00 of its $0.0001 daily budget; it resets at {instant}."),
            "insufficient_quota",
            "insufficient_quota",
        ),
    )
    assert error_reply(post(server, both)) == nothing_spent
    assert mock_upstream.stats()["requests"] == 0, "the upstream was called for a request the budget cannot cover"
    swapped = {**CHAT, "max_tokens": 1, "max_completion_tokens": 1000}
    assert error_reply(post(server, swapped)) == nothing_spent
    assert post(server, {**CHAT, "max_tokens": 1, "max_completion_tokens": 1}).status_code == 200


def test_a_shadow_budget_never_refuses_but_counts_and_logs_each_would_be_refusal(on_redis, caplog):
    """`enforce: false`: every call is served; each one the budget would have refused is counted
    as llm_proxy_rejections_total{shadow="true"} and logged (naming no key)."""
    shadow = [{"window": "month", "usd": "0.00003", "enforce": False}]
    server = on_redis(lambda data: data["keys"]["alice"].update(budgets=shadow))
    with caplog.at_level("WARNING", logger="proxy.limits"):
        # committed before each call: 0, 11, 22, 33, 44 µ$; with its 14 µ$ reservation the 3rd,
        # 4th and 5th would pass 30 µ$
        assert [post(server).status_code for _ in range(5)] == [200] * 5
    server.wait_settled()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'llm_proxy_rejections_total{key="alice",reason="budget",shadow="true",team="platform"} 3.0' in metrics
    assert 'shadow="false"' not in metrics  # nothing was refused
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shadow mode")]
    assert (
        logged
        == ["shadow mode: the monthly budget of key alice ($0.00003) would have refused a request of team platform"] * 3
    )
    assert not any(secret in line for line in logged for secret in KEYS.values())


def test_usage_by_end_user_over_a_window_lists_the_top_spenders(on_redis):
    """End users as the request names them (safety_identifier, else user, else the header), booked
    in the ledger and reported per window, the top spender first; never a metric label."""
    server = on_redis(lambda data: None)
    assert post(server, {**CHAT, "user": "ann"}).status_code == 200
    assert post(server, {**CHAT, "user": "ann"}).status_code == 200
    assert post(server, {**CHAT, "user": "ann", "safety_identifier": "sid-1"}).status_code == 200
    assert post(server, headers={"x-proxy-end-user": "hdr"}).status_code == 200
    for window in ("day", "week", "month"):
        report = admin_get(server, "/admin/usage", window=window, by="end_user").json()
        assert [(r["team"], r["end_user"], r["requests"], r["spend_micros"]) for r in report["rows"]] == [
            ("platform", "ann", 2, 2 * COST),
            ("platform", "hdr", 1, COST),
            ("platform", "sid-1", 1, COST),
        ]
    assert admin_get(server, "/admin/usage", window="month").json()["date"] == datetime.now(ZoneInfo("UTC")).strftime(
        "%Y-%m"
    )
    refused = admin_get(server, "/admin/usage", window="year")
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "`window` must be day, week or month."
    metrics = httpx.get(server.url + "/metrics").text
    assert "ann" not in metrics and "sid-1" not in metrics and "hdr" not in metrics


PLATFORM_ADMIN = "sk-admin-platform-5555"


def grouping_setup(redis_url):
    def patch(data):
        budget(key_usd="1", team_usd="10")(data)
        data["admin_keys"] = {
            "platform-ops": {
                "key_sha256": hashlib.sha256(PLATFORM_ADMIN.encode()).hexdigest(),
                "scope": {"team": "platform"},
            }
        }

    return patch


def cli_table(config_path, by):
    """`llm-proxy usage --config FILE --by BY` (straight from the store): its header and rows, split."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "usage", "--config", str(config_path), "--by", by],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    return lines[1].split(), [line.split() for line in lines[2:-1]]


def as_cells(row, columns):
    """A row of the API's answer as the CLI prints it."""
    return ["-" if row[c] is None else f"{row[c]:.6f}" if isinstance(row[c], float) else str(row[c]) for c in columns]


def test_admin_usage_by_answers_with_the_clis_rows(on_redis, redis_url, tmp_path):
    """`/admin/usage?by=...` answers with the rows `llm-proxy usage --by` prints (here read by the
    CLI straight from Redis), each team's end users the top spender first; a team-scoped admin sees
    its team only; without `by` the answer is the nested report the CLI's `--json` prints."""
    patch = grouping_setup(redis_url)
    server = on_redis(patch)
    end_users = [
        ("alice", {"user": "ann"}, {"x-proxy-tags": "role=auditor"}),
        ("alice", {"user": "ann", "metadata": {"role": "analyst"}}, {}),
        ("bob", {"user": "ann"}, {}),
        ("bob", {"safety_identifier": "sid-1", "user": "ann"}, {"x-proxy-tags": "role=auditor,workflow=nightly"}),
        ("alice", {}, {"x-proxy-end-user": "hdr"}),
        ("bob", {}, {"x-proxy-end-user": "hdr"}),
        ("carol", {"user": "zed"}, {}),
    ]
    for key, extra, headers in end_users:
        assert post(server, {**CHAT, **extra}, key=key, headers=headers).status_code == 200
    text = {"model": "text-model", "prompt": "hello there", "max_tokens": 4}
    assert post(server, text, endpoint="/completions").status_code == 200  # another model, no end user
    config_path = tmp_path / "config.json"  # JSON is YAML
    data = config_dict("http://127.0.0.1:9/v1", redis_url=redis_url)
    patch(data)
    config_path.write_text(json.dumps(data))

    nested = admin_get(server, "/admin/usage").json()
    assert set(nested) == {"date", "currency", "total", "teams"}
    cli_json = subprocess.run(
        [sys.executable, "-m", "proxy", "usage", "--config", str(config_path), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli_json.returncode == 0, cli_json.stderr
    assert json.loads(cli_json.stdout) == nested
    for by in ("team", "key", "model", "tag", "end_user"):
        answer = admin_get(server, "/admin/usage", by=by).json()
        assert {k: v for k, v in answer.items() if k != "rows"} == {
            "date": nested["date"],
            "currency": "USD",
            "by": by,
            "total": nested["total"],
        }
        columns, cli_rows = cli_table(config_path, by)
        assert [as_cells(row, columns) for row in answer["rows"]] == cli_rows, by
        assert cli_rows, by
    rows = {by: admin_get(server, "/admin/usage", by=by).json()["rows"] for by in ("key", "model", "tag", "end_user")}
    assert [(r["team"], r["end_user"], r["requests"], r["spend_micros"]) for r in rows["end_user"]] == [
        ("platform", "ann", 3, 3 * COST),  # safety_identifier comes before user: sid-1 is not ann
        ("platform", "hdr", 2, 2 * COST),
        ("platform", "sid-1", 1, COST),
        ("research", "zed", 1, COST),
    ]
    assert [(r["team"], r["key"], r["requests"], r["budget_usd"]) for r in rows["key"]] == [
        ("platform", "alice", 4, 1.0),
        ("platform", "bob", 3, None),
        ("research", "carol", 1, None),
    ]
    assert [(r["key"], r["model"], r["requests"]) for r in rows["model"]] == [
        ("alice", "chat-model", 3),
        ("alice", "text-model", 1),
        ("bob", "chat-model", 3),
        ("carol", "chat-model", 1),
    ]
    assert {(r["tag"], r["requests"]) for r in rows["tag"]} == {
        ("role=auditor", 2),
        ("role=analyst", 1),
        ("workflow=nightly", 1),
        ("user=ann", 4),
        ("user=zed", 1),
    }

    scoped = admin_get(server, "/admin/usage", key=PLATFORM_ADMIN, by="end_user").json()
    assert [r["end_user"] for r in scoped["rows"]] == ["ann", "hdr", "sid-1"]
    assert scoped["total"]["spend_micros"] == nested["teams"]["platform"]["spend_micros"]
    assert error_reply(admin_get(server, "/admin/usage", by="user")) == (
        400,
        openai_error("`by` must be team, key, model, tag or end_user.", INVALID, None, "by"),
    )
    metrics = httpx.get(server.url + "/metrics").text
    assert not any(name in metrics for name in ("ann", "sid-1", "hdr", "zed"))


@pytest.mark.parametrize("fmt", ["json", "slack"])
def test_window_alerts_fire_once_per_threshold_and_post_the_chosen_format(on_redis, caplog, fmt):
    """`alerts: {thresholds, webhook_url, format}` on a team's month budget: each threshold fires
    once (settle.lua's HSETNX per threshold), retried off the request path, never carrying a key."""
    receiver = WebhookReceiver(fail_first=1)
    try:

        def patch(data):
            data["teams"]["platform"]["budgets"] = [{"window": "month", "usd": "0.0001"}]
            data["alerts"] = {"thresholds": [0.2, 0.5], "webhook_url": receiver.url, "format": fmt}

        server = on_redis(patch)
        with caplog.at_level("WARNING", logger="proxy.budgets.watch"):
            # spent after each call: 11, 22 (crosses 20 µ$), 33, 44, 55 (crosses 50 µ$), 66, 77
            for _ in range(7):
                assert post(server).status_code == 200
            deadline = time.monotonic() + 10
            while len(receiver.events) < 2:
                assert time.monotonic() < deadline, f"webhooks not delivered: {receiver.events}"
                time.sleep(0.02)
        time.sleep(0.3)
        month = datetime.now(ZoneInfo("UTC")).strftime("%Y-%m")
        texts = [
            f"budget alert: team 'platform' has spent ${spent} of its $0.0001 monthly budget for {month} ({ratio})"
            for spent, ratio in (("0.000022", "20% threshold"), ("0.000055", "50% threshold"))
        ]
        assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("budget alert")] == texts
        assert receiver.attempts == 3  # the first post failed and was retried
        if fmt == "slack":
            assert receiver.events == [{"text": text} for text in texts]
        else:
            assert [
                (e["scope"], e["name"], e["window"], e["period"], e["spent_usd"], e["threshold"])
                for e in receiver.events
            ] == [
                ("team", "platform", "month", month, "0.000022", 0.2),
                ("team", "platform", "month", month, "0.000055", 0.5),
            ]
        assert not any(secret in json.dumps(receiver.events) for secret in (*KEYS.values(), UPSTREAM_KEY, ADMIN_KEY))
    finally:
        receiver.close()


def test_end_user_limits_apply_to_each_end_user_of_the_team(on_redis):
    """`teams.NAME.end_users.limits`: each distinct end user gets its own rpm; the refusal names the
    end user as the request did; another end user, or a request naming none, is not limited."""
    server = on_redis(lambda data: data["teams"]["platform"].update(end_users={"limits": {"rpm": 2}}))
    assert [post(server, {**CHAT, "user": "ann"}).status_code for _ in range(2)] == [200, 200]
    refused = post(server, {**CHAT, "user": "ann"})
    assert refused.status_code == 429
    message = refused.json()["error"]["message"]
    assert message.startswith("Rate limit reached for end user 'ann' on requests per minute. Please try again in ")
    assert post(server, headers={"x-proxy-end-user": "bob"}).status_code == 200
    assert [post(server).status_code for _ in range(3)] == [200, 200, 200]


def test_a_limit_in_shadow_mode_never_refuses_but_counts_and_logs(on_redis, caplog):
    server = on_redis(lambda data: data["keys"]["alice"].update(limits={"rpm": 1, "enforce": False}))
    with caplog.at_level("WARNING", logger="proxy.limits"):
        assert [post(server).status_code for _ in range(3)] == [200, 200, 200]
    server.wait_settled()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'llm_proxy_rejections_total{key="alice",reason="rpm",shadow="true",team="platform"} 2.0' in metrics
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shadow mode")]
    assert logged == ["shadow mode: the requests per minute limit of key alice would have refused a request"] * 2
