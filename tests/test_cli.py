"""The CLI as a user runs it: subprocesses, exit codes, and what they print."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from proxy.cli.commands import main
from tests.support.ports import free_port

ROOT = Path(__file__).parent.parent


def run_cli(*args, stdin: str | None = None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_check_config_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_KEY", "sk-upstream")
    monkeypatch.setenv("CI_BOT_KEY", "sk-proxy-ci-bot")
    config = tmp_path / "ok.yaml"
    config.write_text(
        "upstreams:\n  ds: {base_url: 'https://api.deepseek.com/v1', api_key_env: DS_KEY}  # ${NOT_SET} in a comment\n"
        "models:\n  deepseek-chat: {targets: [{upstream: ds, model: deepseek-chat}]}\n"
        "teams:\n  platform: {daily_budget_usd: 100, limits: {rpm: 600, tpm: 1000000, max_parallel: 20}}\n"
        "keys:\n  ci-bot: {team: platform, key_env: CI_BOT_KEY, limits: {rpm: '${RPM:-60}'}}\n"
    )
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    for fragment in (
        "ds: https://api.deepseek.com/v1",
        "deepseek-chat: ds/deepseek-chat",
        "platform: rpm 600",
        "ci-bot (team platform): rpm 60",
    ):
        assert fragment in out, out


def test_missing_env_var_is_reported(tmp_path, capsys):
    config = tmp_path / "env.yaml"
    config.write_text(
        "upstreams:\n  u: {base_url: '${LLM_PROXY_TEST_UNSET_URL}'}\n"
        "models:\n  m: {targets: [{upstream: u, model: m}]}\n"
    )
    with pytest.raises(SystemExit):
        main(["check-config", str(config)])
    assert "${LLM_PROXY_TEST_UNSET_URL}: environment variable is not set" in capsys.readouterr().err


def test_new_key_and_hash_key():
    created = run_cli("new-key")
    assert created.returncode == 0
    key, config_line = created.stdout.splitlines()[:2]
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert digest in config_line and config_line.startswith("key_sha256:")
    hashed = run_cli("hash-key", stdin=key + "\n")
    assert hashed.returncode == 0 and hashed.stdout.strip() == digest
    assert run_cli("hash-key", stdin="").returncode == 1


def test_demo_answers_a_real_sdk_call():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}/v1"
        sdk = openai.OpenAI(base_url=base, api_key="sk-proxy-demo", max_retries=0, timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = sdk.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "Hi"}])
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, "demo did not start"
                time.sleep(0.2)
        assert reply.choices[0].message.content
        stream = sdk.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        assert sum(1 for _ in stream) > 1
        sdk.close()
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=15)
    assert f"curl -s {base}/chat/completions" in output
    assert 'OpenAI(base_url="' + base in output


IN_PROCESS = (
    "upstreams:\n  mock: {base_url: 'http://127.0.0.1:9/v1'}\n"
    "models:\n  m: {targets: [{upstream: mock, model: m}]}\n"
    "teams:\n  t: {}\n"
    "keys:\n  alice: {team: t, key: sk-proxy-alice}\n"
)


@pytest.fixture
def in_process_config(tmp_path) -> Path:
    path = tmp_path / "in_process.yaml"
    path.write_text(IN_PROCESS, encoding="utf-8")
    return path


def test_serve_with_workers_needs_redis(in_process_config):
    result = run_cli("serve", "--config", str(in_process_config), "--port", str(free_port()), "--workers", "2")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        (
            "llm-proxy serve: --workers 2 needs store.redis_url: with the in-process store each worker would "
            "keep its own limits, budgets and spend"
        )
    ]


def test_usage_without_redis_says_there_is_no_shared_ledger(in_process_config):
    result = run_cli("usage", "--config", str(in_process_config))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        (
            "llm-proxy usage: no shared ledger: the config has no store.redis_url, and the in-process store "
            "keeps usage inside the serving process (ask it with --url)"
        )
    ]


def test_usage_with_redis_down_is_one_line(tmp_path):
    path = tmp_path / "redis.yaml"
    path.write_text(
        f"store: {{redis_url: 'redis://:sk-redis-pw@127.0.0.1:{free_port()}/0', timeout_ms: 200}}\n" + IN_PROCESS,
        encoding="utf-8",
    )
    result = run_cli("usage", "--config", str(path))
    assert (result.returncode, result.stdout) == (1, "")
    (line,) = result.stderr.splitlines()
    assert line.startswith("llm-proxy usage: Redis did not answer: ") and "sk-redis-pw" not in line


def test_usage_url_of_a_proxy_that_is_down_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("usage", "--url", url, env={"LLM_PROXY_ADMIN_KEY": "sk-admin-x"})
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [f"llm-proxy usage: cannot reach {url}: [Errno 111] Connection refused"]


@pytest.mark.parametrize("reader", ["head -1", "true"])
def test_new_key_into_a_closed_pipe_prints_no_traceback(reader):
    """A real shell pipe: `true` exits before the key is written, `head -1` after the first line.
    Unbuffered, as in the Docker image, so every line is its own write."""
    command = f"{sys.executable} -m proxy new-key | {reader}"
    result = subprocess.run(
        ["sh", "-c", command],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.stderr == ""
    assert len(result.stdout.splitlines()) == (1 if reader == "head -1" else 0)
