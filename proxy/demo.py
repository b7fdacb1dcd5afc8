"""`llm-proxy demo`: the proxy on embedded defaults, with the built-in mock upstream.

No API key, no Redis, no config file: the in-process store and one demo key.
"""

from __future__ import annotations

import uvicorn

from .app import create_app
from .config import Config, parse_config
from .mock_upstream import MockUpstream
from .server import configure_logging

DEMO_KEY = "sk-proxy-demo"


def demo_config(upstream_url: str, port: int) -> Config:
    return parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            "upstreams": {"mock": {"base_url": upstream_url, "api_key": "mock-upstream-key", "max_retries": 2}},
            "models": {
                "demo-chat": {
                    "targets": [{"upstream": "mock", "model": "mock-chat"}],
                    "context_window": 32000,
                    "default_max_tokens": 256,
                    "price_per_mtok": {"input": "0.27", "output": "1.10", "cached_input": "0.07"},
                },
                "demo-embed": {
                    "targets": [{"upstream": "mock", "model": "mock-embed"}],
                    "price_per_mtok": {"input": "0.02"},
                },
            },
            "teams": {"demo": {"daily_budget_usd": 5, "limits": {"rpm": 120, "tpm": 200000, "max_parallel": 8}}},
            "keys": {
                "demo": {
                    "team": "demo",
                    "key": DEMO_KEY,
                    "limits": {"rpm": 60, "tpm": 100000, "max_parallel": 4},
                    "daily_budget_usd": 1,
                }
            },
        }
    )


def instructions(host: str, port: int) -> str:
    base = f"http://{host}:{port}/v1"
    return f"""
llm-ratelimit-proxy demo: proxy on {base}, mock upstream, in-process store, key {DEMO_KEY}

Try it with curl:
  curl -s {base}/chat/completions -H "Authorization: Bearer {DEMO_KEY}" -H "Content-Type: application/json" -d '{{"model": "demo-chat", "messages": [{{"role": "user", "content": "Hello"}}]}}'

Or with the OpenAI SDK (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="{DEMO_KEY}")
  print(client.chat.completions.create(model="demo-chat", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)

Limits on this key: 60 requests/min, 100k tokens/min, 4 in parallel, $1/day. Ctrl-C stops.
"""


def run_demo(host: str = "127.0.0.1", port: int = 8080) -> None:
    with MockUpstream(chunk_delay_s=0.02) as mock:
        config = demo_config(mock.url, port)
        configure_logging("info")
        app = create_app(config)
        print(instructions(host, port), flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
