"""Logs are JSON lines whatever the message: quotes, backslashes, newlines, non-ASCII, tracebacks.

The formatter alone over a table of hostile records, then the whole output of real
`python -m proxy serve` processes (one worker, and `--workers 2`, whose spawned workers never run
`serve` and must get the JSON handler from uvicorn's per-worker log config): every line parses.

The processes meet a bug through a `sitecustomize` module on their PYTHONPATH that makes the
upstream client raise an unforeseen exception with a hostile message: the proxy logs it with its
traceback (and answers 500). Nothing in proxy/ knows about it.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from proxy.logs import JsonFormatter, logging_config
from tests.support.configs import KEYS, config_dict
from tests.support.ports import free_port
from tests.support.processes import ROOT, Process, proxy_process, start_all, stop_all, write_config

HOSTILE = 'a "quoted" \\back\\slash\nsecond line\ttab, é ü 中文 🙂 \x1b[31m {"json": true}'
ODD_KEY = 'odd "key"\n\u00e9\u4e2d'  # an unknown field: named in the reload's refusal
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
BUG = f"""
import aiohttp


class InjectedBug(RuntimeError):
    pass


async def _request(self, *args, **kwargs):
    raise InjectedBug({HOSTILE!r})


aiohttp.ClientSession._request = _request  # every upstream call meets the bug
"""


def record(msg: object, args: tuple = (), *, exc: BaseException | None = None, stack: str | None = None):
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    made = logging.LogRecord("proxy.gateway", logging.ERROR, __file__, 1, msg, args, exc_info)
    made.stack_info = stack
    return made


def raised(message: str) -> BaseException:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


@pytest.mark.parametrize(
    ("made", "fields"),
    [
        (record(HOSTILE), {"message": HOSTILE}),
        (record("config %s refused: %r", ('x"y\nz', "é")), {"message": "config x\"y\nz refused: 'é'"}),
        (record("nul \x00 and bell \x07"), {"message": "nul \x00 and bell \x07"}),
        (
            record("%d items", ("not a number",)),
            {"message": "%d items (unformattable log arguments: ('not a number',))"},
        ),
        (record(ValueError("not a string")), {"message": "not a string"}),
        (record("bytes \udcff smuggled"), {"message": "bytes \\udcff smuggled"}),
        (record("failed", exc=raised(HOSTILE)), {"message": "failed", "traceback": ...}),
        (
            record("where", stack='Stack (most recent call last):\n  File "x.py", line 1'),
            {"message": "where", "stack": 'Stack (most recent call last):\n  File "x.py", line 1'},
        ),
    ],
    ids=["hostile", "args", "control", "bad-args", "non-str", "surrogate", "traceback", "stack"],
)
def test_every_record_is_one_json_line(made, fields):
    line = JsonFormatter().format(made)
    assert "\n" not in line and "\r" not in line
    parsed = orjson.loads(line)
    expected = {"event": "log", "level": "ERROR", "logger": "proxy.gateway", **fields}
    if fields.get("traceback") is ...:
        assert parsed["traceback"].startswith("Traceback (most recent call last):\n")
        assert parsed["traceback"].endswith(f"ValueError: {HOSTILE}")
        expected["traceback"] = parsed["traceback"]
    assert parsed == expected


def test_the_config_sends_every_logger_through_the_json_handler():
    config = logging_config("info")
    assert config["root"] == {"level": "INFO", "handlers": ["stderr"]}
    assert all(logger["handlers"] == [] and logger["propagate"] for logger in config["loggers"].values())


def output_lines(process: Process) -> list[dict]:
    text = process.output()
    assert text.endswith("\n"), text[-500:]
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            lines.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pytest.fail(f"line {number} of {process.name}'s output is not JSON: {line!r}\n{text}")
    return lines


def with_bug(tmp_path: Path) -> dict[str, str]:
    """The environment of a process that loads `BUG` at start-up."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(BUG, encoding="utf-8")
    return {"PYTHONPATH": os.pathsep.join([str(inject), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def failing_call(url: str, request_id: str) -> None:
    response = httpx.post(
        url + "/v1/chat/completions",
        json=CHAT,
        timeout=10,
        headers={"Authorization": f"Bearer {KEYS['alice']}", "x-request-id": request_id, "Connection": "close"},
    )
    assert response.status_code == 500, response.text


def tracebacks(lines: list[dict]) -> list[dict]:
    return [line for line in lines if "traceback" in line]


def assert_the_bug_was_logged(line: dict) -> None:
    assert (line["event"], line["level"]) == ("log", "ERROR")
    assert line["traceback"].startswith("Traceback (most recent call last):\n")
    assert line["traceback"].endswith(f"InjectedBug: {HOSTILE}")


def test_serve_writes_json_lines_whatever_the_message(tmp_path):
    data = config_dict(f"http://127.0.0.1:{free_port()}/v1")  # never reached: the bug comes first
    data["log_level"] = "info"  # uvicorn's start-up lines and the request log as well
    config = write_config(tmp_path / "config.yaml", data)
    server = proxy_process(config, env=with_bug(tmp_path))
    try:
        start_all([server])
        failing_call(server.url, 'req-"quoted"-\\-{}')
        bad = copy.deepcopy(data)
        bad["teams"]["platform"][ODD_KEY] = 1
        config.write_text(yaml.safe_dump(bad, allow_unicode=True), encoding="utf-8")
        server.signal(signal.SIGHUP)  # refused, with the bad key in its message, verbatim
        deadline = time.monotonic() + 10
        while "reload refused" not in server.output():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
    finally:
        stop_all([server])
    lines = output_lines(server)
    [bug] = tracebacks(lines)
    assert_the_bug_was_logged(bug)
    assert 'req-"quoted"-\\-{}' in bug["message"]
    [refused] = [line for line in lines if "reload refused" in line.get("message", "")]
    assert ODD_KEY in refused["message"] and refused["level"] == "ERROR"
    assert any(line.get("logger") == "uvicorn.error" for line in lines)  # uvicorn's own lines, as JSON
    assert [line["status"] for line in lines if line["event"] == "request"] == [500]


def test_spawned_workers_write_json_lines(tmp_path, redis_url):
    data = config_dict(f"http://127.0.0.1:{free_port()}/v1", redis_url=redis_url)
    data["log_level"] = "info"
    config = write_config(tmp_path / "config.yaml", data)
    port = free_port()
    server = Process(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), "--workers", "2"],
        port,
        "/healthz",
        name="proxy",
        workdir=tmp_path,
        env=with_bug(tmp_path),
    )
    try:
        start_all([server])
        deadline = time.monotonic() + 20
        while server.output().count("Application startup complete") < 2:  # both workers are up
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        for number in range(6):  # new connections: either worker may take each
            failing_call(server.url, f"worker-call-{number}")
    finally:
        stop_all([server])
    lines = output_lines(server)
    started = [line for line in lines if line.get("message", "").startswith("Started server process")]
    assert len(started) == 2 and all(line["logger"] == "uvicorn.error" for line in started)
    bugs = tracebacks(lines)
    assert len(bugs) == 6
    for line in bugs:
        assert_the_bug_was_logged(line)
