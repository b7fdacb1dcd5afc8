"""`llm-proxy usage --what-if`: a real proxy books traffic in Redis; the month's ledger, re-priced,
from the store and from the running proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx

from proxy.cli.what_if import month_days
from tests.support.configs import ADMIN_KEY, KEYS, config_dict, make_config

ROOT = Path(__file__).parent.parent
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
# the mock reports 1 prompt and 10 completion tokens; chat-model books round(0.27 + 11) = 11 µ$ each
PRICES = (
    "alternatives:\n"
    "  double:\n"
    "    prices: {chat-model: {input: '0.54', output: '2.20'}}\n"
    "  gpt-4o:\n"
    "    map: {chat-model: gpt-4o}\n"
)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "usage", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "LLM_PROXY_ADMIN_KEY": ADMIN_KEY},
    )


def test_what_if_reprices_the_months_ledger(mock_upstream, start_proxy, redis_url, tmp_path: Path) -> None:
    server, _ = start_proxy(make_config(mock_upstream.url, redis_url=redis_url))
    for _ in range(3):
        response = httpx.post(
            server.base_url + "/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {KEYS['alice']}"},
            timeout=10,
        )
        assert response.status_code == 200
    server.wait_settled()
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES, encoding="utf-8")
    config = tmp_path / "config.json"  # JSON is YAML
    config.write_text(json.dumps(config_dict("http://127.0.0.1:9/v1", redis_url=redis_url)), encoding="utf-8")
    month = datetime.now(UTC).strftime("%Y-%m")

    from_store = run_cli("--config", str(config), "--what-if", str(prices), "--month", month, "--json")
    assert from_store.returncode == 0, from_store.stderr
    report = json.loads(from_store.stdout)
    assert report["alternatives"] == ["double", "gpt-4o"]
    chat, total = report["rows"]
    assert chat == {
        "model": "chat-model",
        "tokens": {"input": 3, "cached_input": 0, "cache_write": 0, "output": 30, "reasoning": 0},
        # 3 x 11 booked; 3 x 0.54 + 30 x 2.20 = 67.62; at gpt-4o's list price 3 x 2.5 + 30 x 10 = 307.5
        "today_micros": 33,
        "costs_micros": {"double": 68, "gpt-4o": 308},
    }
    assert total["model"] == "total" and total["costs_micros"] == {"double": 68, "gpt-4o": 308}

    from_proxy = run_cli("--url", server.url, "--what-if", str(prices), "--month", month)
    assert from_proxy.returncode == 0, from_proxy.stderr
    assert [" ".join(line.split()) for line in from_proxy.stdout.splitlines()[1:]] == [
        "model input cached_input cache_write output reasoning today double gpt-4o",
        "chat-model 3 0 0 30 0 0.000033 0.000068 0.000308",
        "total 3 0 0 30 0 0.000033 0.000068 0.000308",
    ]


def test_a_bad_prices_file_or_month_is_refused(tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("alternatives:\n  a: {prices: {m: {input: -1}}}\n", encoding="utf-8")
    result = run_cli("--url", "http://127.0.0.1:9", "--what-if", str(prices))
    assert (result.returncode, result.stderr.splitlines()) == (
        1,
        [f"{prices}: invalid prices file", "  alternatives.a.prices.m.input: must be >= 0"],
    )
    prices.write_text("alternatives: {}\n", encoding="utf-8")
    result = run_cli("--url", "http://127.0.0.1:9", "--what-if", str(prices), "--month", "2026-13")
    assert result.returncode == 1 and "--month '2026-13': expected YYYY-MM" in result.stderr


def test_month_days() -> None:
    assert month_days("2028-02")[-1] == "2028-02-29" and len(month_days("2026-11")) == 30
