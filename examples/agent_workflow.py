#!/usr/bin/env python3
"""A multi-agent workflow through the proxy, and a per-role cost report from its ledger.

Seventeen specialised roles run a DAG of tasks with the official `openai` SDK. Independent tasks
run concurrently (at most --concurrency at a time); a task starts only after its dependencies
finished, and its prompt carries a short summary of their outputs. Every request is tagged
`x-proxy-tags: role=<role>,workflow=<name>`; streamed and plain calls are mixed.

The proxy's 429s: rate limits (`rate_limit_exceeded`, with retry-after) are retried by the SDK
itself (--max-retries); a budget refusal (`insufficient_quota`, never retried) stops that role and
is reported. Tasks whose dependencies did not complete are skipped as `blocked`.

At the end the day's spend per role tag is read from `GET /admin/usage` and printed as a table
(or JSON with --json). The spend is the ledger's: every run of the day with these role tags.

    PROXY_API_KEY=sk-proxy-... LLM_PROXY_ADMIN_KEY=sk-admin-... python examples/agent_workflow.py \\
        --base-url http://127.0.0.1:8080/v1 --admin-url http://127.0.0.1:8080

`--loop` repeats the workflow forever with a pause (the docker compose traffic generator).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from graphlib import TopologicalSorter

import httpx
import openai
from openai import AsyncOpenAI

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_WORKFLOW = "nightly"
DEFAULT_CONCURRENCY = 4
DEFAULT_MAX_RETRIES = 5
DEFAULT_PAUSE_S = 20.0
TAGS_HEADER = "x-proxy-tags"
SUMMARY_CHARS = 240  # how much of a dependency's output goes into the next prompt
USAGE_FIELDS = ("spend_micros", "requests", "prompt_tokens", "completion_tokens")
TAG_VALUE = re.compile(r"^[A-Za-z0-9_.:/@-]{1,64}$")  # what the proxy accepts in a tag

ROLES = {
    "api_design": "You design clean, versioned HTTP APIs with precise error models.",
    "database_design": "You design relational schemas, indexes and migrations.",
    "code_generator": "You write small, idiomatic, well-tested Python services.",
    "testing": "You write focused unit and integration tests and name the edge cases.",
    "security_auditor": "You audit code for injection, authz and secrets-handling flaws.",
    "documentation": "You write concise developer documentation with runnable examples.",
    "data_analyst": "You analyse usage data and state findings with numbers.",
    "performance": "You find hot paths and propose measurable optimisations.",
    "observability": "You define SLOs, metrics, logs and dashboards.",
    "devops": "You build CI/CD pipelines and container deployments.",
    "mlops": "You plan model training, serving and monitoring pipelines.",
    "incident_response": "You write incident runbooks: detection, triage, mitigation, comms.",
    "disaster_recovery": "You plan backups, failover and recovery objectives (RPO/RTO).",
    "capacity_planning": "You forecast load and size infrastructure with headroom.",
    "cost_optimisation": "You cut cloud and LLM spend without hurting reliability.",
    "compliance": "You check designs against GDPR and SOC 2 controls.",
    "customer_support": "You answer customers clearly and escalate what needs engineering.",
}


@dataclass(frozen=True)
class Task:
    id: str
    role: str
    prompt: str
    deps: tuple[str, ...] = ()
    stream: bool = False
    max_tokens: int = 96


TASKS = (
    Task(
        "design_api",
        "api_design",
        "Design the REST API of an invoicing service: resources, verbs, errors.",
        stream=True,
    ),
    Task("design_schema", "database_design", "Design the tables and indexes for invoices, customers and payments."),
    Task(
        "triage_tickets",
        "customer_support",
        "Triage this week's top customer tickets about invoice exports.",
        stream=True,
        max_tokens=64,
    ),
    Task(
        "implement_service",
        "code_generator",
        "Implement the invoicing service endpoints.",
        deps=("design_api", "design_schema"),
        stream=True,
        max_tokens=160,
    ),
    Task(
        "analyse_usage",
        "data_analyst",
        "Which invoice queries dominate load? Propose three metrics.",
        deps=("design_schema",),
    ),
    Task(
        "write_tests",
        "testing",
        "Write the test plan and key tests for the service.",
        deps=("implement_service",),
        stream=True,
    ),
    Task(
        "profile_hot_paths",
        "performance",
        "Profile the service and list the three slowest paths.",
        deps=("implement_service",),
    ),
    Task(
        "define_slos",
        "observability",
        "Define SLOs, alerts and a dashboard for the service.",
        deps=("implement_service",),
        stream=True,
    ),
    Task(
        "audit_code",
        "security_auditor",
        "Audit the implementation and tests; list findings by severity.",
        deps=("write_tests",),
        max_tokens=128,
    ),
    Task(
        "build_pipeline",
        "devops",
        "Write the CI/CD pipeline: lint, test, build, deploy with rollback.",
        deps=("write_tests",),
    ),
    Task(
        "plan_model_serving",
        "mlops",
        "Plan a late-payment prediction model from the usage analysis.",
        deps=("analyse_usage",),
        stream=True,
    ),
    Task(
        "forecast_capacity",
        "capacity_planning",
        "Forecast next quarter's load and size the cluster.",
        deps=("profile_hot_paths", "analyse_usage"),
    ),
    Task(
        "write_runbook",
        "incident_response",
        "Write the incident runbook for invoice-export outages.",
        deps=("define_slos",),
    ),
    Task(
        "fix_findings",
        "code_generator",
        "Fix the security findings and the slowest path.",
        deps=("audit_code", "profile_hot_paths"),
        stream=True,
        max_tokens=128,
    ),
    Task(
        "write_docs",
        "documentation",
        "Write the API guide with examples, noting the security fixes.",
        deps=("audit_code", "design_api"),
        stream=True,
        max_tokens=128,
    ),
    Task(
        "review_costs",
        "cost_optimisation",
        "Review infrastructure and LLM costs against the forecast.",
        deps=("forecast_capacity",),
    ),
    Task(
        "plan_recovery",
        "disaster_recovery",
        "Set RPO/RTO and the backup and failover plan.",
        deps=("write_runbook", "design_schema"),
    ),
    Task(
        "review_compliance",
        "compliance",
        "Check the audit and recovery plan against GDPR and SOC 2.",
        deps=("audit_code", "plan_recovery"),
        stream=True,
    ),
    Task(
        "answer_customers",
        "customer_support",
        "Draft replies to the triaged tickets using the new docs.",
        deps=("write_docs", "triage_tickets"),
        max_tokens=64,
    ),
)


def check_workflow(tasks: tuple[Task, ...]) -> None:
    """Every role has work, every role and dependency is known, and the graph has no cycle."""
    ids = {task.id for task in tasks}
    if len(ids) != len(tasks):
        raise ValueError("task ids must be unique")
    for task in tasks:
        if task.role not in ROLES:
            raise ValueError(f"task {task.id!r}: unknown role {task.role!r}")
        if unknown := set(task.deps) - ids:
            raise ValueError(f"task {task.id!r}: unknown dependencies {sorted(unknown)}")
    if idle := set(ROLES) - {task.role for task in tasks}:
        raise ValueError(f"roles without a task: {sorted(idle)}")
    TopologicalSorter({task.id: task.deps for task in tasks}).prepare()  # raises CycleError


check_workflow(TASKS)


class UsageUnavailable(RuntimeError):
    """GET /admin/usage did not answer with a report."""


def _describe(exc: openai.APIError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return body.get("message") or exc.message


def _summary(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 3] + "..."


class WorkflowRun:
    """One pass over the DAG: each task an asyncio task awaiting its dependencies' records."""

    def __init__(self, client: AsyncOpenAI, model: str, workflow: str, concurrency: int):
        self.client = client
        self.model = model
        self.workflow = workflow
        self.slots = asyncio.Semaphore(concurrency)
        self.stopped: dict[str, str] = {}  # role -> why its budget refusal stopped it
        self.t0 = time.perf_counter()

    def _now(self) -> float:
        return round(time.perf_counter() - self.t0, 6)

    async def run(self, tasks: tuple[Task, ...]) -> list[dict]:
        by_id = {task.id: task for task in tasks}
        running: dict[str, asyncio.Task] = {}
        async with asyncio.TaskGroup() as group:
            for task_id in TopologicalSorter({task.id: task.deps for task in tasks}).static_order():
                task = by_id[task_id]
                deps = [running[dep] for dep in task.deps]
                running[task_id] = group.create_task(self._run_task(task, deps), name=task_id)
        return [running[task.id].result() for task in tasks]

    async def _run_task(self, task: Task, deps: list[asyncio.Task]) -> dict:
        done = [await dep for dep in deps]
        record = {
            "id": task.id,
            "role": task.role,
            "deps": list(task.deps),
            "stream": task.stream,
            "status": "blocked",
            "started_s": None,
            "ended_s": None,
            "error": None,
            "output": "",
        }
        if waiting := [dep["id"] for dep in done if dep["status"] != "ok"]:
            record["error"] = f"dependencies did not complete: {', '.join(waiting)}"
            return record
        async with self.slots:
            if task.role in self.stopped:
                record.update(status="stopped", error=f"role stopped: {self.stopped[task.role]}")
                return record
            record["started_s"] = self._now()
            try:
                record.update(status="ok", output=await self._call(task, done))
            except openai.RateLimitError as exc:
                if exc.code == "insufficient_quota":
                    self.stopped.setdefault(task.role, _describe(exc))
                    record.update(status="budget_exhausted", error=_describe(exc))
                else:  # still rate limited after the SDK's retries
                    record.update(status="failed", error=_describe(exc))
            except openai.APIError as exc:
                record.update(status="failed", error=_describe(exc))
            record["ended_s"] = self._now()
        return record

    def _messages(self, task: Task, done: list[dict]) -> list[dict]:
        prompt = task.prompt
        if done:
            context = "\n".join(f"- {dep['id']} ({dep['role']}): {_summary(dep['output'])}" for dep in done)
            prompt += "\n\nWhat earlier steps produced:\n" + context
        return [{"role": "system", "content": ROLES[task.role]}, {"role": "user", "content": prompt}]

    async def _call(self, task: Task, done: list[dict]) -> str:
        request = {
            "model": self.model,
            "messages": self._messages(task, done),
            "max_tokens": task.max_tokens,
            "extra_headers": {TAGS_HEADER: f"role={task.role},workflow={self.workflow}"},
        }
        if not task.stream:
            reply = await self.client.chat.completions.create(**request)
            return reply.choices[0].message.content or ""
        parts = []
        stream = await self.client.chat.completions.create(**request, stream=True)
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
        return "".join(parts)


async def fetch_usage(admin_url: str, admin_key: str, timeout_s: float = 10.0) -> dict:
    """Today's usage overview from the proxy's admin API."""
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as http:
            response = await http.get(
                admin_url.rstrip("/") + "/admin/usage", headers={"Authorization": f"Bearer {admin_key}"}
            )
    except httpx.HTTPError as exc:
        raise UsageUnavailable(f"GET /admin/usage failed: {exc!r}") from None
    if response.status_code != 200:
        raise UsageUnavailable(f"GET /admin/usage answered {response.status_code}: {response.text[:200]}")
    return response.json()


async def fetch_settled_usage(admin_url: str, admin_key: str, tag: str, settle_s: float = 2.0) -> dict:
    """The usage once the last requests' spend has landed: the proxy settles a request just after
    its last byte, so read until the tag's request count stops moving."""
    usage = await fetch_usage(admin_url, admin_key)
    deadline = time.perf_counter() + settle_s
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
        again = await fetch_usage(admin_url, admin_key)
        if _tag_usage(again, tag)["requests"] == _tag_usage(usage, tag)["requests"]:
            return again
        usage = again
    return usage


def _tag_usage(usage: dict, tag: str) -> dict:
    """One tag's integers summed over every team, plus spend_usd."""
    line = dict.fromkeys(USAGE_FIELDS, 0)
    for team in usage["teams"].values():
        for field in USAGE_FIELDS:
            line[field] += team["tags"].get(tag, {}).get(field, 0)
    return {"spend_usd": line["spend_micros"] / 1_000_000, **line}


def build_report(
    usage: dict, records: list[dict], stopped: dict[str, str], *, workflow: str, model: str, duration_s: float
) -> dict:
    roles = {}
    for role in ROLES:
        statuses = [record["status"] for record in records if record["role"] == role]
        status = "budget_exhausted" if role in stopped else next((s for s in statuses if s != "ok"), "ok")
        roles[role] = {
            **_tag_usage(usage, f"role={role}"),
            "tasks": len(statuses),
            "completed": statuses.count("ok"),
            "status": status,
        }
    total = {field: sum(line[field] for line in roles.values()) for field in USAGE_FIELDS}
    return {
        "workflow": workflow,
        "model": model,
        "date": usage["date"],
        "currency": "USD",
        "duration_s": round(duration_s, 3),
        "roles": roles,
        "total": {"spend_usd": total["spend_micros"] / 1_000_000, **total},
        "workflow_tag": _tag_usage(usage, f"workflow={workflow}"),
        "stopped_roles": dict(stopped),
        "tasks": [
            {key: value for key, value in record.items() if key != "output"} | {"output_chars": len(record["output"])}
            for record in records
        ],
    }


async def run_workflow(
    *,
    base_url: str,
    admin_url: str,
    api_key: str,
    admin_key: str,
    model: str = DEFAULT_MODEL,
    workflow: str = DEFAULT_WORKFLOW,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_retries: int = DEFAULT_MAX_RETRIES,
    timeout_s: float = 60.0,
    tasks: tuple[Task, ...] = TASKS,
) -> dict:
    """Run the workflow once through the proxy; return the report (see `build_report`)."""
    check_workflow(tasks)
    if not TAG_VALUE.match(workflow):
        raise ValueError(f"workflow name {workflow!r} is not a valid tag value (letters, digits, _.:/@-)")
    started = time.perf_counter()
    async with AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout_s) as client:
        run = WorkflowRun(client, model, workflow, concurrency)
        records = await run.run(tasks)
    duration_s = time.perf_counter() - started
    usage = await fetch_settled_usage(admin_url, admin_key, f"workflow={workflow}")
    return build_report(usage, records, run.stopped, workflow=workflow, model=model, duration_s=duration_s)


def format_table(report: dict) -> str:
    columns = ("role", "requests", "prompt_tokens", "completion_tokens", "spend_usd", "status")
    rows = [
        (
            role,
            str(line["requests"]),
            str(line["prompt_tokens"]),
            str(line["completion_tokens"]),
            f"{line['spend_usd']:.6f}",
            line["status"],
        )
        for role, line in report["roles"].items()
    ]
    total = report["total"]
    rows.append(
        (
            "TOTAL",
            str(total["requests"]),
            str(total["prompt_tokens"]),
            str(total["completion_tokens"]),
            f"{total['spend_usd']:.6f}",
            "",
        )
    )
    widths = [max(len(row[i]) for row in (columns, *rows)) for i in range(len(columns))]

    def line(row) -> str:
        return "  ".join(
            cell.ljust(w) if i in (0, 5) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    tasks = report["tasks"]
    ok = sum(task["status"] == "ok" for task in tasks)
    out = [
        f"workflow {report['workflow']!r} with {report['model']}: {ok}/{len(tasks)} tasks ok "
        f"in {report['duration_s']:.2f} s; spend per role on {report['date']} ({report['currency']}, "
        "the day's ledger)",
        line(columns),
        line(["-" * w for w in widths]),
        *map(line, rows[:-1]),
        line(["-" * w for w in widths]),
        line(rows[-1]),
    ]
    for role, why in report["stopped_roles"].items():
        out.append(f"stopped {role}: {why}")
    for task in tasks:
        if task["status"] not in ("ok", "stopped", "blocked") and task["role"] not in report["stopped_roles"]:
            out.append(f"{task['id']} ({task['role']}) {task['status']}: {task['error']}")
    return "\n".join(out)


def emit(report: dict, as_json: bool) -> None:
    print(json.dumps(report, indent=2) if as_json else format_table(report), flush=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1", help="the proxy's OpenAI base URL")
    parser.add_argument("--admin-url", default="http://127.0.0.1:8080", help="the proxy's root, for /admin/usage")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--workflow", default=DEFAULT_WORKFLOW, help="the workflow=<name> tag")
    parser.add_argument(
        "--concurrency", type=_positive_int, default=DEFAULT_CONCURRENCY, help="tasks in flight at once"
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=DEFAULT_MAX_RETRIES,
        help="the SDK's retries of rate-limit 429s and connection errors",
    )
    parser.add_argument("--loop", action="store_true", help="repeat forever, pausing between runs")
    parser.add_argument("--pause", type=float, default=DEFAULT_PAUSE_S, help="seconds between runs with --loop")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--api-key", default=os.environ.get("PROXY_API_KEY"), help="default: $PROXY_API_KEY")
    parser.add_argument(
        "--admin-key", default=os.environ.get("LLM_PROXY_ADMIN_KEY"), help="default: $LLM_PROXY_ADMIN_KEY"
    )
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("set PROXY_API_KEY or pass --api-key (a proxy key)")
    if not args.admin_key:
        parser.error("set LLM_PROXY_ADMIN_KEY or pass --admin-key (for /admin/usage)")
    if not TAG_VALUE.match(args.workflow):
        parser.error("--workflow must be 1-64 letters, digits or _.:/@-")
    return args


async def _run_once(args: argparse.Namespace) -> dict:
    return await run_workflow(
        base_url=args.base_url,
        admin_url=args.admin_url,
        api_key=args.api_key,
        admin_key=args.admin_key,
        model=args.model,
        workflow=args.workflow,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
    )


async def _loop(args: argparse.Namespace) -> None:
    """Run, report, pause, forever; an unreachable proxy is reported and tried again next time."""
    while True:
        try:
            emit(await _run_once(args), args.json)
        except UsageUnavailable as exc:
            print(f"agent_workflow: {exc}", file=sys.stderr, flush=True)
        await asyncio.sleep(args.pause)


def main(argv: list[str] | None = None) -> int:
    """0 when every task completed, 1 when some did not (or the report was unavailable)."""
    args = parse_args(argv)
    try:
        if args.loop:
            asyncio.run(_loop(args))  # until interrupted
        report = asyncio.run(_run_once(args))
    except UsageUnavailable as exc:
        print(f"agent_workflow: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    emit(report, args.json)
    return 0 if all(task["status"] == "ok" for task in report["tasks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
