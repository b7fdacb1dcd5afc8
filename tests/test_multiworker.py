"""`llm-proxy serve --workers N`: workers share Redis limits and one aggregated /metrics."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import httpx

from tests.support.configs import KEYS, config_dict, exact_store
from tests.support.ports import free_port
from tests.support.processes import Process, start_all, stop_all, write_config


def counter(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_workers_aggregate_metrics_and_share_limits(tmp_path: Path, redis_url, mock_process):
    mock = mock_process
    data = exact_store(config_dict(mock.base_url, redis_url=redis_url))
    data["keys"]["alice"]["limits"] = {"rpm": 1, "rpm_burst": 30}  # refills one a minute: exact over the run
    config = write_config(tmp_path / "config.yaml", data)
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    server = Process(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), "--workers", "2"],
        port,
        "/healthz",
        name="proxy",
        workdir=tmp_path,
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    try:
        start_all([server])
        statuses = []
        # new connections, so both workers take requests; the kernel may still hand every one of the
        # first 40 to one worker (on loaded cores it did), so on until the other has taken one too,
        # all refused by then (the bucket refills one a minute)
        deadline = time.monotonic() + 20
        while len(statuses) < 40 or len(worker_pids(metrics_dir)) < 2:
            assert time.monotonic() < deadline, f"only one worker took requests: {sorted(metrics_dir.iterdir())}"
            response = httpx.post(
                server.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {KEYS['alice']}", "Connection": "close"},
                json={"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            )
            statuses.append(response.status_code)
        refused = len(statuses) - 30
        assert statuses.count(200) == 30 and statuses.count(429) == refused  # one shared bucket of 30
        for _ in range(6):  # whichever worker answers, the totals are the aggregate
            text = httpx.get(server.url + "/metrics", headers={"Connection": "close"}).text
            assert counter(text, "llm_proxy_requests_total", status="200") == 30
            assert counter(text, "llm_proxy_rejections_total", reason="rpm") == refused
            assert counter(text, "llm_proxy_tokens_total", kind="completion") == 30 * 5
    finally:
        stop_all([server])


def worker_pids(metrics_dir: Path) -> set[str]:
    """The processes that wrote metrics (prometheus_client's multiprocess files end in _PID.db)."""
    if not metrics_dir.exists():
        return set()
    return {m.group(1) for f in metrics_dir.iterdir() if (m := re.search(r"_(\d+)\.db$", f.name))}
