"""Helpers shared by the CI's docker checks: run a command, fail loudly, wait with a bound.

CI only (see .ci/docker/run). Every wait has a deadline; every failure raises `CheckFailed` with
what was expected and what was seen, and the scripts exit non-zero on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


class CheckFailed(Exception):
    """A deployment check did not hold."""


def say(message: str) -> None:
    print(message, flush=True)


def fail(message: str) -> NoReturn:
    raise CheckFailed(message)


def ok(message: str) -> None:
    say(f"ok: {message}")


def run(
    args: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """Run `args`, capturing text output; with `check`, a non-zero exit fails with its output."""
    merged = {**os.environ, **(env or {})}
    try:
        done = subprocess.run(
            list(args),
            cwd=cwd,
            env=merged,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        fail(f"{' '.join(args)}: no answer in {timeout:.0f} s")
    if check and done.returncode != 0:
        fail(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def inspect(container: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(run(["docker", "inspect", container]).stdout)
    return found[0]


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.5) -> T:
    """Call `probe` until it returns something other than None (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            result = probe()
            if result is not None:
                return result
        except CheckFailed:
            raise
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            fail(f"{what}: not within {timeout_s:.0f} s (last error: {last!r})")
        time.sleep(interval_s)


def wait_healthy(container: str, timeout_s: float) -> float:
    """Wait until `container`'s HEALTHCHECK reports healthy; return the seconds it took."""
    start = time.monotonic()

    def healthy() -> bool | None:
        state = inspect(container)["State"]
        if not state["Running"]:
            fail(
                f"{container} is not running: {state}\n"
                f"{run(['docker', 'logs', '--tail', '40', container], check=False).stderr}"
            )
        health = state.get("Health")
        if health is None:
            fail(f"{container} has no HEALTHCHECK")
        return True if health["Status"] == "healthy" else None

    wait_for(f"{container} healthy", healthy, timeout_s)
    return time.monotonic() - start


def main(checks: Callable[[], None]) -> None:
    try:
        checks()
    except CheckFailed as exc:
        print(f"FAIL: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
