"""examples/agent_workflow.py end to end: the mock upstream, the proxy under uvicorn, the SDK."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.configs import ADMIN_KEY, KEYS, make_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent_workflow.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("agent_workflow", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def admin_usage(server) -> dict:
    response = httpx.get(server.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert response.status_code == 200
    return response.json()


def run(example, server, key="alice", **options) -> dict:
    return asyncio.run(
        example.run_workflow(
            base_url=server.base_url,
            admin_url=server.url,
            api_key=KEYS[key],
            admin_key=ADMIN_KEY,
            model="chat-model",
            **options,
        )
    )


def assert_dependencies_respected(report: dict) -> None:
    """Every task that ran started after each of its dependencies completed."""
    tasks = {task["id"]: task for task in report["tasks"]}
    for task in tasks.values():
        if task["started_s"] is None:  # blocked or stopped: never called
            continue
        for dep in task["deps"]:
            assert tasks[dep]["status"] == "ok", f"{task['id']} ran although {dep} did not complete"
            assert task["started_s"] >= tasks[dep]["ended_s"], f"{task['id']} started before {dep} ended"


def max_in_flight(report: dict) -> int:
    events = sorted(
        [(t["started_s"], 1) for t in report["tasks"]] + [(t["ended_s"], -1) for t in report["tasks"]],
        key=lambda event: (event[0], event[1]),
    )  # an end before a start at the same instant
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def assert_matches_ledger(report: dict, usage: dict, team: str) -> None:
    roles = report["roles"]
    role_sum = sum(line["spend_micros"] for line in roles.values())
    assert report["total"]["spend_micros"] == role_sum == usage["teams"][team]["spend_micros"] > 0
    assert report["workflow_tag"]["spend_micros"] == role_sum
    assert report["total"]["requests"] == sum(line["requests"] for line in roles.values())
    assert report["total"]["requests"] == usage["teams"][team]["requests"]


def test_workflow_runs_every_role_in_dependency_order(example, mock_upstream, start_proxy):
    server, recorder = start_proxy(make_config(mock_upstream.url))
    report = run(example, server, workflow="nightly", concurrency=3)

    assert set(report["roles"]) == set(example.ROLES) and len(report["roles"]) == 17
    for role, line in report["roles"].items():
        assert line["requests"] > 0 and line["status"] == "ok", role
        assert line["requests"] == line["tasks"] == line["completed"]
    assert [task["status"] for task in report["tasks"]] == ["ok"] * len(example.TASKS)
    assert report["stopped_roles"] == {}
    assert_matches_ledger(report, admin_usage(server), "platform")
    assert sum(o.cost_micros for o in recorder.outcomes) == report["total"]["spend_micros"]

    assert_dependencies_respected(report)
    assert 1 < max_in_flight(report) <= 3
    seen = mock_upstream.requests
    assert len(seen) == len(example.TASKS)
    assert {request["body"]["model"] for request in seen} == {"gpt-4o-mini"}  # chat-model rewritten
    assert {request["body"].get("stream", False) for request in seen} == {True, False}
    # a dependent task's prompt carries its dependencies' outputs (the mock answers "word0 word1 ...")
    prompts = [request["body"]["messages"][-1]["content"] for request in seen]
    assert any("design_api (api_design): word0 word1" in prompt for prompt in prompts)


def test_cli_prints_the_report_as_json(mock_upstream, start_proxy):
    server, _ = start_proxy(make_config(mock_upstream.url))
    env = {**os.environ, "PROXY_API_KEY": KEYS["carol"], "LLM_PROXY_ADMIN_KEY": ADMIN_KEY}
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--base-url",
            server.base_url,
            "--admin-url",
            server.url,
            "--model",
            "chat-model",
            "--workflow",
            "weekly",
            "--concurrency",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["roles"]) == 17 and all(line["requests"] > 0 for line in report["roles"].values())
    usage = admin_usage(server)
    assert_matches_ledger(report, usage, "research")  # carol's team
    assert usage["teams"]["platform"]["spend_micros"] == 0
    assert set(usage["teams"]["research"]["tags"]) >= {"workflow=weekly", "role=security_auditor"}
    assert_dependencies_respected(report)

    table = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--base-url",
            server.base_url,
            "--admin-url",
            server.url,
            "--model",
            "chat-model",
            "--workflow",
            "weekly",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    assert "security_auditor" in table.stdout and "TOTAL" in table.stdout


def test_budget_refusal_stops_the_role_and_is_reported(example, mock_upstream, start_proxy):
    def small_budget(data):
        data["keys"]["alice"]["daily_budget_usd"] = "0.0004"  # a handful of requests

    server, recorder = start_proxy(make_config(mock_upstream.url, patch=small_budget))
    report = run(example, server, concurrency=1)

    stopped = report["stopped_roles"]
    refusal = r"Key `alice` has spent \$0\.000\d+ of its \$0\.0004 daily budget; it resets at \S+Z\."
    assert stopped and all(re.fullmatch(refusal, why) for why in stopped.values()), stopped
    for role in stopped:
        assert report["roles"][role]["status"] == "budget_exhausted"
    statuses = {task["status"] for task in report["tasks"]}
    assert {"ok", "budget_exhausted", "blocked"} <= statuses
    refused = [task for task in report["tasks"] if task["status"] == "budget_exhausted"]
    assert len(recorder.outcomes) == len(mock_upstream.requests) + len(refused), "the SDK retried a budget refusal"
    assert_matches_ledger(report, admin_usage(server), "platform")
    assert_dependencies_respected(report)


def test_rate_limit_refusals_are_retried_by_the_sdk(example, mock_upstream, start_proxy):
    def two_at_once(data):
        data["keys"]["alice"]["limits"] = {"max_parallel": 2}

    server, recorder = start_proxy(make_config(mock_upstream.url, patch=two_at_once))
    mock_upstream.add_faults([{"first_byte_delay_s": 0.3}] * 2)  # two roots hold both slots; the third waits
    report = run(example, server, concurrency=4)

    refused = [o for o in recorder.outcomes if o.status == 429]
    assert refused and all(o.error_code == "rate_limit_exceeded" for o in refused)
    assert [task["status"] for task in report["tasks"]] == ["ok"] * len(example.TASKS)
    assert len(mock_upstream.requests) == len(example.TASKS)
    assert_matches_ledger(report, admin_usage(server), "platform")
