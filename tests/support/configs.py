"""Configs for tests: one mock upstream, a few models, teams and keys with plaintext dev keys."""

from __future__ import annotations

import copy

import yaml

from proxy.config import ENV_VAR_PATTERN, Config, parse_config

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
ADMIN_KEY = "sk-admin-secret-abcdef"
KEYS = {"alice": "sk-proxy-alice-1111", "bob": "sk-proxy-bob-2222", "carol": "sk-proxy-carol-3333"}


def config_dict(upstream_url: str, *, redis_url: str | None = None, second_upstream: str | None = None) -> dict:
    from proxy.request.authenticate import sha256_hex

    upstreams = {
        "mock": {
            "base_url": upstream_url,
            "api_key": UPSTREAM_KEY,
            "max_retries": 2,
            "timeout_s": 5,
            "connect_timeout_s": 1,
        }
    }
    if second_upstream:
        upstreams["backup"] = {
            "base_url": second_upstream,
            "api_key": UPSTREAM_KEY,
            "max_retries": 0,
            "timeout_s": 5,
            "connect_timeout_s": 1,
        }
    chat_targets = [{"upstream": "mock", "model": "gpt-4o-mini"}]
    if second_upstream:
        chat_targets.append({"upstream": "backup", "model": "gpt-4o"})
    return {
        "log_level": "warning",
        "admin_key_sha256": sha256_hex(ADMIN_KEY),
        "store": {"redis_url": redis_url} if redis_url else {},
        "upstreams": upstreams,
        "models": {
            "chat-model": {
                "targets": chat_targets,
                "context_window": 4096,
                "default_max_tokens": 64,
                "price_per_mtok": {"input": "0.27", "output": "1.10", "cached_input": "0.07"},
            },
            "text-model": {
                "targets": [{"upstream": "mock", "model": "gpt-3.5-turbo-instruct"}],
                "price_per_mtok": {"input": "1.5", "output": "2"},
            },
            "embed-model": {
                "targets": [{"upstream": "mock", "model": "text-embedding-3-small"}],
                "price_per_mtok": {"input": "0.02"},
            },
            "small-model": {
                "targets": [{"upstream": "mock", "model": "gpt-4o-mini"}],
                "context_window": 100,
                "default_max_tokens": 16,
                "context_overflow": "truncate",
            },
        },
        "teams": {"platform": {"limits": {}}, "research": {"limits": {}}},
        "keys": {
            "alice": {"team": "platform", "key": KEYS["alice"]},
            "bob": {"team": "platform", "key": KEYS["bob"], "models": ["chat-model"]},
            "carol": {"team": "research", "key": KEYS["carol"]},
        },
    }


def exact_store(data: dict) -> dict:
    """For exactness tests: the Redis path only. `deny` turns a slow store into a visible 503
    instead of fallback admissions (whose limits are per process by design), and a generous
    timeout keeps a loaded store (fakeredis, where redis-server is missing) from timing out."""
    data["store"] = {**data["store"], "on_redis_error": "deny", "timeout_ms": 5000}
    return data


def make_config(
    upstream_url: str, *, redis_url: str | None = None, second_upstream: str | None = None, patch=None
) -> Config:
    data = config_dict(upstream_url, redis_url=redis_url, second_upstream=second_upstream)
    if patch is not None:
        data = copy.deepcopy(data)
        patch(data)
    return parse_config(data)


def example_environ(text: str, values: dict[str, str] | None = None) -> dict[str, str]:
    """A value for every variable a config file names: each `${VAR}` without a default, and each
    `admin_key_env` / `api_key_env` / `key_env` (a different value each: no two keys collide).
    `values` gives chosen values for some names."""
    names = {m.group(1) for m in ENV_VAR_PATTERN.finditer(text) if m.group(2) is None}
    data = yaml.safe_load(text)
    names.add(data.get("admin_key_env"))
    names |= {upstream.get("api_key_env") for upstream in data.get("upstreams", {}).values()}
    names |= {key.get("key_env") for key in (data.get("keys") or {}).values()}
    names.discard(None)
    return {name: (values or {}).get(name, f"example-{name.lower()}") for name in names}
