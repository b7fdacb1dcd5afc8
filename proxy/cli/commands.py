"""`llm-proxy`: serve, demo, check-config, prices, new-key, hash-key, usage, keys, teams."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import DEFAULT_PORT, Config, Limits
from ..request.authenticate import new_key, sha256_hex
from .config_file import CONFIG_ENV, config_path, load_or_exit

DEMO_HOST_ENV = "LLM_PROXY_DEMO_HOST"  # the image sets 0.0.0.0: `docker run -p 8080:8080 IMAGE demo`


def cmd_serve(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    config = load_or_exit(path)
    if args.workers < 1:
        raise SystemExit("llm-proxy serve: --workers must be at least 1")
    if args.workers > 1 and config.store.redis_url is None:
        raise SystemExit(
            f"llm-proxy serve: --workers {args.workers} needs store.redis_url: with the in-process "
            "store each worker would keep its own limits, budgets and spend"
        )
    os.environ[CONFIG_ENV] = path
    from ..server import serve

    serve(config, host=args.host or config.listen.host, port=args.port or config.listen.port, workers=args.workers)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(host=args.host, port=args.port)
    return 0


def summary(config: Config) -> str:
    store = (
        f"redis {_redact_url(config.store.redis_url)}" if config.store.redis_url else "in-process (one process only)"
    )
    lines = [
        f"listen: {config.listen.host}:{config.listen.port}",
        f"store: {store} (on_redis_error: {config.store.on_redis_error})",
        f"upstreams ({len(config.upstreams)}):",
    ]
    for name, upstream in config.upstreams.items():
        lines.append(f"  {name}: {upstream.base_url} (retries {upstream.max_retries}, timeout {upstream.timeout_s}s)")
    lines.append(f"models ({len(config.models)}):")
    for name, model in config.models.items():
        targets = " -> ".join(f"{t.upstream}/{t.model}" for t in model.targets)
        price = model.price_per_mtok
        lines.append(f"  {name}: {targets}  ${price.input}/${price.output} per Mtok")
    lines.append(f"teams ({len(config.teams)}):")
    for name, team in config.teams.items():
        budget = f"${team.daily_budget_usd}/day" if team.daily_budget_usd else "no budget"
        lines.append(f"  {name}: {_limits(team.limits)}, {budget}")
    lines.append(f"keys ({len(config.keys)}):")
    for name, key in config.keys.items():
        budget = f"${key.daily_budget_usd}/day" if key.daily_budget_usd else "no budget"
        models = ", ".join(key.models) if key.models is not None else "all models"
        lines.append(f"  {name} (team {key.team}): {_limits(key.limits)}, {budget}, {models}")
    return "\n".join(lines)


def _limits(limits: Limits) -> str:
    parts = [
        f"{name} {value}" for name in ("rpm", "tpm", "max_parallel") if (value := getattr(limits, name)) is not None
    ]
    return ", ".join(parts) or "no limits"


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_or_exit(args.file)
    print(f"{args.file}: ok")
    print(summary(config))
    for name, model in config.models.items():
        if not model.has_price:
            print(
                f"warning: models.{name}: no price (price_per_mtok or price: catalog): its spend would read $0",
                file=sys.stderr,
            )
    return 0


def cmd_prices(args: argparse.Namespace) -> int:
    from ..pricing.catalog import catalog_listing, catalog_table

    print(orjson_dumps(catalog_listing()) if args.json else catalog_table())
    return 0


def orjson_dumps(value: object) -> str:
    import orjson

    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def cmd_new_key(args: argparse.Namespace) -> int:
    key = new_key()
    print(key)
    print(f'key_sha256: "{sha256_hex(key)}"   # put this line in the config; the key above is shown once')
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        print("llm-proxy hash-key: no key on stdin (usage: llm-proxy hash-key < keyfile)", file=sys.stderr)
        return 1
    print(sha256_hex(key))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    if getattr(args, "what_if", None):  # `llm-proxy usage --what-if PRICES.yaml`
        from .what_if import run_what_if

        return run_what_if(args)
    from .usage import run_usage

    return run_usage(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description="OpenAI-compatible rate-limiting proxy")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(func=cmd_serve)

    demo = commands.add_parser("demo", help="run the proxy on built-in defaults with a mock upstream")
    demo.add_argument(
        "--host",
        default=os.environ.get(DEMO_HOST_ENV, "127.0.0.1"),
        help=f"address to listen on (default: ${DEMO_HOST_ENV} or 127.0.0.1)",
    )
    demo.add_argument("--port", type=int, default=DEFAULT_PORT)
    demo.set_defaults(func=cmd_demo)

    check = commands.add_parser("check-config", help="validate a config file and summarise it")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    prices = commands.add_parser("prices", help="list the price catalog (public list prices, USD per Mtok)")
    prices.add_argument("--json", action="store_true")
    prices.set_defaults(func=cmd_prices)

    key = commands.add_parser("new-key", help="print a fresh proxy key and its sha256 config line")
    key.set_defaults(func=cmd_new_key)

    hashing = commands.add_parser("hash-key", help="read a key from stdin, print its sha256")
    hashing.set_defaults(func=cmd_hash_key)

    usage = commands.add_parser("usage", help="spend and tokens per team, key, model or tag")
    usage.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    usage.add_argument("--url", help="ask a running proxy's /admin/usage instead of reading the store")
    usage.add_argument(
        "--admin-key-env", default="LLM_PROXY_ADMIN_KEY", help="environment variable holding the admin key (with --url)"
    )
    usage.add_argument("--date", help="YYYY-MM-DD (default: today in budget_timezone)")
    usage.add_argument("--by", choices=["team", "key", "model", "tag", "end_user"], default="team")
    usage.add_argument(
        "--window", choices=["day", "week", "month"], default="day", help="the window containing --date (default day)"
    )
    usage.add_argument("--json", action="store_true")
    usage.add_argument("--what-if", metavar="PRICES.yaml", help="re-price the month's tokens at these prices")
    usage.add_argument("--month", help="YYYY-MM for --what-if (default: this month in budget_timezone)")
    usage.set_defaults(func=cmd_usage)

    from .registry import add_parsers

    add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `llm-proxy new-key | head -1`: the reader has what it wanted
        _silence_stdout()
        return 1
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail once more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
