"""Config that would silently misbehave is refused, by `check-config` and by `serve` alike, with
every problem's dotted path in our own words. Each bad config is a fixture in tests/fixtures/bad/,
its exact stderr asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import proxy.server
from proxy.cli.commands import main
from proxy.cli.config_file import CONFIG_ENV
from tests.support.ports import free_port

ROOT = Path(__file__).parent.parent
BAD = Path(__file__).parent / "fixtures" / "bad"
TIMEOUT_S = 20

# fixture -> (environment, exact problems in order)
REFUSED: dict[str, tuple[dict[str, str], list[str]]] = {
    "rpm_zero.yaml": ({}, ["teams.platform.limits.rpm: must be > 0"]),
    "many.yaml": (
        {},
        [
            "listen.port: must be <= 65535",
            "upstreams.mock.base_url: must start with http:// or https://",
            "upstreams.mock.timeout: unknown field",
            "models.m.price_per_mtok.input: must be >= 0",
            "teams.platform.daily_budget_usd: must be > 0",
            "keys.bot: exactly one of key_sha256, key_env or key is required",
        ],
    ),
    "refs.yaml": (
        {},
        [
            "models.m.targets.0.upstream: unknown upstream 'ghost'",
            "keys.bot.team: unknown team 'nobody'",
            "keys.bot.models: unknown model 'unknown'",
        ],
    ),
    "same_key_value.yaml": ({}, ["keys.bob.key: same key as keys.alice.key"]),
    "unknown_api.yaml": ({}, ["upstreams.other.api: must be 'openai' or 'anthropic'"]),
    "mixed_apis.yaml": ({}, ["models.m.targets: every target's upstream must speak one api, not anthropic and openai"]),
    "budget_fallback.yaml": (
        {},
        [
            "models.big.on_budget_exhausted.fallback_model: unknown model 'ghost'",
            "models.opus.on_budget_exhausted.fallback_model: 'small' speaks the openai api and this model "
            "anthropic: a fallback must answer the same calls",
            "models.small.on_budget_exhausted.fallback_model: a cycle (small -> tiny -> small): a fallback chain "
            "must end",
            "models.itself.on_budget_exhausted.fallback_model: a cycle (itself -> itself): a fallback chain must end",
        ],
    ),
    "upstream_quota_shapes.yaml": (
        {},
        [
            "upstreams.azure.limits: give rpm, tpm or max_parallel (a quota without them limits nothing)",
            "upstreams.spare.limits.rpm: must be > 0",
            "upstreams.spare.limits.rpm_burst: unknown field",
            "models.big.targets.0.limits.tpm: must be an integer",
        ],
    ),
    "upstream_quotas_on_cluster.yaml": (
        {},
        [
            "upstreams.openai.limits: an upstream quota needs standalone Redis: it is checked in the same script "
            "as every team's limits, and on a Redis Cluster each team lives in its own slot",
            "models.big.targets.1.limits: an upstream quota needs standalone Redis: it is checked in the same "
            "script as every team's limits, and on a Redis Cluster each team lives in its own slot",
            "models.small.targets.0.limits: an upstream quota needs standalone Redis: it is checked in the same "
            "script as every team's limits, and on a Redis Cluster each team lives in its own slot",
            "models.small.targets.0.limits: models.big.targets.1.limits gives upstream 'azure' and model "
            "'gpt-4o' other limits: one deployment has one quota",
        ],
    ),
    "same_key_hash.yaml": (
        {"LLMP_TEST_CAROL_KEY": "sk-proxy-same", "LLMP_TEST_ADMIN_KEY": "sk-admin-too"},
        [
            "keys.bob.key: same key as keys.alice.key_sha256",
            "keys.carol.key_env: same key as keys.alice.key_sha256",
            "keys.dave.key: same key as admin_key_env",
        ],
    ),
    "repeated_mapping_key.yaml": (
        {},
        [
            "models.m.targets.0.model: repeated key (line 8)",
            "keys.alice.limits.rpm: repeated key (line 15)",
            "teams: repeated key (line 16)",
            "keys.alice.team: unknown team 't'",  # the last `teams` is the one that would count
        ],
    ),
    "unset_env.yaml": (
        {"LLMP_TEST_EMPTY": "", "LLMP_TEST_SET": "sk-upstream-2"},
        [
            "admin_key_env: environment variable LLMP_TEST_UNSET_ADMIN is not set",
            "upstreams.mock.api_key_env: environment variable LLMP_TEST_UNSET_UPSTREAM is not set",
            "upstreams.empty.api_key_env: environment variable LLMP_TEST_EMPTY is empty",
            "upstreams.both.api_key_env: give api_key or api_key_env, not both",
            "keys.alice.key_env: environment variable LLMP_TEST_UNSET_ALICE is not set",
            "keys.bob.key: must not be empty",
        ],
    ),
    "not_integers.yaml": (
        {"LLMP_TEST_RPM": "1.5"},
        [
            "listen.port: must be an integer",
            "store.timeout_ms: must be an integer",
            "upstreams.mock.timeout_s: must be a number",
            "upstreams.mock.max_retries: must be an integer",
            "models.m.default_max_tokens: must be an integer",
            "teams.t.limits.rpm: must be an integer",
            "teams.t.limits.tpm: must be an integer",
            "teams.t.limits.max_parallel: must be an integer",
            "keys.alice.limits.rpm: must be an integer",
        ],
    ),
    "burst_without_rate.yaml": (
        {},
        [
            "teams.t.limits.rpm_burst: needs rpm (a burst alone limits nothing)",
            "keys.alice.limits.tpm_burst: needs tpm (a burst alone limits nothing)",
        ],
    ),
    "budgets_and_prices.yaml": (
        {},
        [
            "models.m.price: no catalog price for 'not-in-catalog' (`llm-proxy prices` lists the catalog)",
            "models.n.price: no catalog price for 'gpt-99' (`llm-proxy prices` lists the catalog)",
            "models.o.price: must be `catalog` or {catalog: NAME}",
            "models.p.price_per_mtok.tiers: above_input_tokens must increase from one tier to the next",
            "teams.t: daily_budget_usd and a day budget in budgets: give one of them",
            "teams.u.budgets: more than one budget for the week window: give one per window",
            "teams.u.end_users.budgets.0.window: must be 'day', 'week' or 'month'",
            "teams.u.end_users.limits.rpm: must be > 0",
            "teams.u.end_users.limits.enforce: must be true or false",
            "org.budgets.0.usd: must be > 0",
            "end_user_identity: each source at most once: user repeated",
            "alerts.thresholds: must increase",
            "alerts.webhook_url: must start with http:// or https://",
            "alerts.format: must be 'json' or 'slack'",
        ],
    ),
    "queue.yaml": (
        {},
        [
            "teams.t.limits.max_wait_ms: must be >= 0",
            "teams.t.share: must be >= 0.001",
            "teams.t.max_queue: must be >= 0",
            "teams.u.limits.max_wait_ms: must be <= 600000",
            "teams.u.end_users.limits: max_wait_ms is set on the key or the team: an end user's requests wait "
            "as theirs do",
            "teams.u.share: must be <= 1000000",
            "keys.alice.limits.max_wait_ms: must be an integer",
            "keys.alice.priority: must be 'high', 'normal' or 'low'",
        ],
    ),
    "everything_at_once.yaml": (
        {},
        [
            "teams.t.limits: repeated key (line 8)",
            "upstreams.mock.api_key_env: environment variable LLMP_TEST_UNSET_UPSTREAM is not set",
            "teams.t.limits.rpm: must be an integer",
            "teams.t.limits.tpm_burst: needs tpm (a burst alone limits nothing)",
            "keys.alice.limits.max_parallel: must be an integer",
        ],
    ),
}


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any LLMP_TEST_* variable, plus `extra`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("LLMP_TEST_")}
    return {**env, **(extra or {})}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
        env=environment(env),
    )


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """cli(*args, env=...) -> (exit status, stdout, stderr) of the CLI's `main` in this process: the
    same parsing, loading and words as `python -m proxy`, without an interpreter start (~0.3 s of
    CPU) for each of the ~70 cases; the process itself is run by test_bad_configs_refused_by_the_process.
    A config that passed would make `serve` fail here, never listen."""

    def never_serve(*args: object, **kwargs: object) -> None:
        raise AssertionError("serve was given a config it should have refused")

    monkeypatch.setattr(proxy.server, "serve", never_serve)
    monkeypatch.setenv(CONFIG_ENV, "")  # serve sets it once a config loads: undone after the test
    monkeypatch.delenv(CONFIG_ENV)

    def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        for name in [name for name in os.environ if name.startswith("LLMP_TEST_")]:
            monkeypatch.delenv(name)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        try:
            status = main(list(args))
        except SystemExit as exit:
            status = 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)  # what the interpreter does with SystemExit("...")
        out, err = capsys.readouterr()
        return status, out, err

    return run


def refusal(path: Path, problems: list[str]) -> list[str]:
    return [f"{path}: invalid configuration", *(f"  {problem}" for problem in problems)]


@pytest.mark.parametrize("fixture", sorted(REFUSED))
def test_check_config_refuses_with_every_problem(fixture: str, cli) -> None:
    env, problems = REFUSED[fixture]
    path = BAD / fixture
    status, out, err = cli("check-config", str(path), env=env)
    assert (status, out) == (1, "")
    assert err.splitlines() == refusal(path, problems)


@pytest.mark.parametrize("fixture", sorted(REFUSED))
def test_serve_refuses_to_start_with_the_same_problems(fixture: str, cli) -> None:
    env, problems = REFUSED[fixture]
    path = BAD / fixture
    status, out, err = cli("serve", "--config", str(path), "--port", str(free_port()), env=env)
    assert (status, out) == (1, "")
    assert err.splitlines() == refusal(path, problems)


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_bad_configs_refused_by_the_process(command: str) -> None:
    """`python -m proxy` itself: exit status 1, nothing on stdout, every problem on stderr."""
    env, problems = REFUSED["many.yaml"]
    path = BAD / "many.yaml"
    args = [str(path)] if command == "check-config" else ["--config", str(path), "--port", str(free_port())]
    result = run_cli(command, *args, env=env)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == refusal(path, problems)


def test_an_integer_from_the_environment_is_still_an_integer(tmp_path: Path, cli) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "upstreams:\n  mock: {base_url: 'http://127.0.0.1:9/v1'}\n"
        "models:\n  m: {targets: [{upstream: mock, model: m}]}\n"
        "teams:\n  t: {limits: {rpm: '${LLMP_TEST_RPM}'}}\n",
        encoding="utf-8",
    )
    status, out, err = cli("check-config", str(path), env={"LLMP_TEST_RPM": "60"})
    assert status == 0, err
    assert "  t: rpm 60, no budget" in out.splitlines()
