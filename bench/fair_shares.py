"""Fair shares of one contended upstream quota, measured over a long run (issue 16's criterion).

    python bench/fair_shares.py                       # 60 s with three teams, then 20 s without one
    python bench/fair_shares.py --together-s 20 --alone-s 10 --replicas 3 --json fair.json

Starts a private redis-server, the mock upstream and `--replicas` `llm-proxy serve` replicas (the
processes tests/test_fair_shares.py uses), with teams `small`, `middle` and `large` of shares
1:2:3 whose keys may wait in the queue (max_wait_ms 2000), and one upstream whose account quota
is `--tpm` tokens a minute, its bucket emptied at the start. Each team sends the same request
from `--clients` clients per replica, each again as soon as it is answered; `large` stops after
`--together-s`, the others go on for `--alone-s` more.

Printed: each team's admitted requests (all the same size, so admitted tokens in proportion) and
share against its weight's, over the whole run together (after a 2 s start) and per 5 s window;
then, after `large` stops, the two others' split per second, and how long until every later 5 s
window is within 10% of 1:2; the total rate before and after (work-conserving: about equal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.fair_run import empty_quota, fair_config, saturate
from tests.support.processes import MockProcess, start_proxies, stop_all, write_config
from tests.support.redis_server import RedisServer

SHARES = {"small": 1.0, "middle": 2.0, "large": 3.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--together-s", type=float, default=60.0)
    parser.add_argument("--alone-s", type=float, default=20.0)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3, help="per replica and team")
    parser.add_argument("--tpm", type=int, default=18_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-fair-"))
    redis_server = RedisServer()
    redis_server.start()
    mock = MockProcess(workdir=workdir / "mock")
    mock.workdir.mkdir()
    mock.start().wait_ready()
    replicas = []
    try:
        config = write_config(
            workdir / "config.yaml", fair_config(mock.base_url, redis_server.url, SHARES, args.tpm, 2000)
        )
        replicas = start_proxies(config, args.replicas)
        empty_quota(redis_server.url)
        end = args.together_s + args.alone_s
        run = asyncio.run(
            saturate([r.url for r in replicas], {"small": end, "middle": end, "large": args.together_s}, args.clients)
        )
        upstream_429 = mock.stats()["rate_limited"]
    finally:
        stop_all([*replicas, mock])
        redis_server.kill()

    total_w = sum(SHARES.values())
    result: dict = {"shares": SHARES, "tpm": args.tpm, "replicas": args.replicas, "refusals": run.others}
    print(f"{args.replicas} replicas, tpm {args.tpm}, shares {SHARES}, {args.clients} clients per replica and team")
    print(f"refusals (429 after the queue's max_wait_ms): {run.others}; upstream 429s: {upstream_429}")

    start, stop = 2.0, args.together_s
    counts = {team: run.count(team, start, stop) for team in SHARES}
    shares = run.shares(list(SHARES), start, stop)
    admitted = sum(counts.values())
    print(f"\nall three, {start:.0f}-{stop:.0f} s: {admitted} admitted, {admitted / (stop - start):.1f}/s")
    for team, w in SHARES.items():
        expected = w / total_w
        off = (shares[team] - expected) / expected * 100
        print(
            f"  {team:<7} share {w:.0f}: {counts[team]:>5} requests  {shares[team] * 100:5.1f}%"
            f"  (expected {expected * 100:5.1f}%, {off:+.1f}%)"
        )
    result["together"] = {"counts": counts, "shares": shares}
    waits = {}
    for team in SHARES:
        ordered = sorted(run.waited[team])
        if ordered:
            waits[team] = {q: ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] for q in (50, 95, 100)}
            print(
                f"  {team:<7} answered in (its queue wait, mostly): p50 {waits[team][50] * 1000:.0f} ms, "
                f"p95 {waits[team][95] * 1000:.0f} ms, max {waits[team][100] * 1000:.0f} ms"
            )
    result["waits_s"] = waits
    print(
        "  per 5 s window: "
        + "  ".join(
            "/".join(f"{run.shares(list(SHARES), t, t + 5)[team] * 100:.0f}" for team in SHARES)
            for t in range(int(start), int(stop) - 4, 5)
        )
        + "  (% small/middle/large)"
    )

    pair = ["small", "middle"]
    seconds = []
    for t in range(int(stop), int(end)):
        c = {team: run.count(team, t, t + 1) for team in pair}
        seconds.append(c)
    print(f"\nafter large stops at {stop:.0f} s, admitted per second (small/middle):")
    print("  " + "  ".join(f"{c['small']}/{c['middle']}" for c in seconds))
    settled = None
    for t in range(int(stop), int(end) - 4):
        if all(abs(run.shares(pair, u, u + 5)["small"] - 1 / 3) <= 0.1 / 3 for u in range(t, int(end) - 4)):
            settled = t - stop
            break
    alone_start = stop + (settled if settled is not None else 0)
    alone_counts = {team: run.count(team, alone_start, end) for team in pair}
    alone = run.shares(pair, alone_start, end)
    rate_before = sum(counts.values()) / (stop - start)
    rate_after = sum(alone_counts.values()) / max(end - alone_start, 1e-9)
    print(
        f"  every 5 s window within 10% of 1:2 from {settled} s after the stop"
        if settled is not None
        else "  never within 10% of 1:2 in every later 5 s window"
    )
    print(f"  from then: small {alone['small'] * 100:.1f}%, middle {alone['middle'] * 100:.1f}% (expected 33.3/66.7)")
    print(f"  rate {rate_before:.1f}/s with three teams, {rate_after:.1f}/s with two")
    result["alone"] = {"settled_after_s": settled, "counts": alone_counts, "shares": alone, "per_second": seconds}
    result["rates"] = {"together": rate_before, "alone": rate_after}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
