"""The fault matrix: every upstream or client failure, through the real proxy, checked end to end.

Each case runs uvicorn on a port with the RedisStore on real Redis (frozen clock), a key with
`max_parallel`, `tpm` and a budget, and the mock upstream injecting the fault. Per case:

- the client sees the right status and an OpenAI-shaped body (a stream: `[DONE]`, or the
  `{"error": ...}` event when the upstream broke mid-stream);
- the parallel slots of key and team are free again and no reservation record is left;
- the token bucket was charged exactly the tokens settled (the next request's remaining tokens);
- the ledger's spend is the cost of the usage the mock reported, 0 for a failed call, or the
  proxy's own estimate where the mock reported none;
- /metrics counted the request once, its upstream errors and retries, and in-flight is back to 0.

Each broken promise raises its own failure class (MetricsMiscount, SlotHeld, EstimateOff, ...), so a
case marked xfail for a known bug would still fail on anything else; none is marked today.
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
import redis

from proxy.limits.redis_store import RedisStore
from proxy.limits.types import Usage
from proxy.pricing.cost import cost_micros
from proxy.tokens import estimate_text_tokens
from tests.support.clock import Clock
from tests.support.configs import ADMIN_KEY, KEYS, make_config
from tests.support.errors import openai_error
from tests.support.metrics import samples
from tests.support.ports import free_port

TEAM, KEY, MODEL = "platform", "alice", "chat-model"
PROBE_MODEL = "probe-model"  # the same prices, always on the healthy mock: reads the bucket afterwards
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
KEY_TPM, TEAM_TPM = 50_000, 100_000  # the key's bucket is the tighter: it is the one in the headers
# The clock is frozen, so buckets never refill here, but Redis expires a bucket in real time once it
# would be full again (+1 s): at 50k tokens a minute a bucket 11 tokens short lived 1.01 s, and a
# probe later than that read a full bucket. Refilling 6 tokens a minute (capacity KEY_TPM), a bucket
# one token short lives 11 s of real time.
KEY_REFILL_TPM = 6
PAR_KEYS = (f"llmrl:{{{TEAM}}}:k:{KEY}:par", f"llmrl:{{{TEAM}}}:t:par")
RESERVATIONS = f"llmrl:{{{TEAM}}}:r:*"
SETTLE_WAIT_S = 5.0
PROMPT_RELEASE_S = 1.0  # a client that left frees its slot within this (the slow upstream takes 2 s)
CLIENT_GIVES_UP_S = 0.3

REPORTED, ZERO, ESTIMATED = "reported", "zero", "estimated"  # what the ledger should hold


class MetricsMiscount(AssertionError):
    """/metrics disagrees with the request that was made (xfail raises= keeps other failures real)."""


class SlotHeld(AssertionError):
    """A client that left did not get its parallel slot released promptly."""


class EstimateOff(AssertionError):
    """The proxy's own usage estimate is not chars / 4 of the text the client got."""


@dataclass(frozen=True)
class Case:
    id: str
    faults: tuple[dict, ...] = ()  # queued FIFO: one per upstream attempt
    stream: bool = False
    status: int = 200  # what the client sees
    error: str | None = None  # the error code, as JSON body (status >= 400) or as SSE event (stream)
    spend: str = REPORTED
    errors: dict[str, int] = field(default_factory=dict)  # llm_proxy_upstream_errors_total by kind
    retries: dict[str, int] = field(default_factory=dict)  # llm_proxy_upstream_retries_total by reason
    upstream: str = "mock"  # mock | refused | refused+backup | unaccepting
    upstream_config: dict = field(default_factory=dict)  # patched into the primary upstream
    client: str = "full"  # full | gives_up (read timeout before any byte) | first_chunk
    min_duration_s: float = 0.0  # a server-given Retry-After was waited for
    cancelled_stream: bool = False  # the mock saw its stream cancelled
    text_estimate: bool = False  # the estimated completion is chars / 4 of the text the client got
    body: dict = field(default_factory=dict)
    metric_status: int | None = None  # llm_proxy_requests_total's status label, if not `status`
    marks: tuple = ()


def http_cases() -> list[Case]:
    cases = []
    for status in (500, 502, 503, 429):
        kind = f"http_{status}"
        cases += [
            Case(
                f"{status}_retry_after_ms_then_ok",
                ({"status": status, "retry_after_ms": "200"},),
                errors={kind: 1},
                retries={kind: 1},
                min_duration_s=0.2,
            ),
            Case(f"{status}_backoff_then_ok", ({"status": status},), errors={kind: 1}, retries={kind: 1}),
            Case(
                f"{status}_exhausted",
                ({"status": status, "retry_after_ms": "10"},) * 3,
                status=502,
                error="upstream_error",
                spend=ZERO,
                errors={kind: 3},
                retries={kind: 2},
            ),
        ]
    return cases


SLOW_STREAM = {"chunk_delay_s": 0.2, "chunks": 30}

CASES = [
    Case("ok_plain"),
    Case("ok_stream", stream=True),
    *http_cases(),
    Case(
        "429_retry_after_s_then_ok",
        ({"status": 429, "retry_after": "1"},),
        errors={"http_429": 1},
        retries={"http_429": 1},
        min_duration_s=1.0,
    ),
    Case(
        "503_then_ok_stream",
        ({"status": 503, "retry_after_ms": "10"},),
        stream=True,
        errors={"http_503": 1},
        retries={"http_503": 1},
    ),
    Case(
        "503_exhausted_stream",
        ({"status": 503, "retry_after_ms": "10"},) * 3,
        stream=True,
        status=502,
        error="upstream_error",
        spend=ZERO,
        errors={"http_503": 3},
        retries={"http_503": 2},
    ),
    Case("reset_before_answer_then_ok", ({"close_connection": True},), errors={"broken": 1}, retries={"broken": 1}),
    Case(
        "connection_refused",
        upstream="refused",
        status=502,
        error="upstream_error",
        spend=ZERO,
        errors={"connect": 3},
        retries={"connect": 2},
    ),
    Case("connection_refused_to_backup", upstream="refused+backup", errors={"connect": 3}, retries={"connect": 2}),
    Case(
        "connection_refused_to_backup_stream",
        upstream="refused+backup",
        stream=True,
        errors={"connect": 3},
        retries={"connect": 2},
    ),
    # A connect timeout surfaces as UpstreamConnectError (proxy/upstream/client.py): 502, kind connect.
    Case(
        "connect_timeout",
        upstream="unaccepting",
        upstream_config={"connect_timeout_s": 0.2},
        status=502,
        min_duration_s=0.6,  # three attempts of 0.2 s each: not refused at once
        error="upstream_error",
        spend=ZERO,
        errors={"connect": 3},
        retries={"connect": 2},
    ),
    Case(
        "read_timeout",
        ({"first_byte_delay_s": 1.0},) * 3,
        upstream_config={"timeout_s": 0.4},
        status=504,
        error="upstream_timeout",
        spend=ZERO,
        errors={"timeout": 3},
        retries={"timeout": 2},
    ),
    Case(
        "read_timeout_stream",
        ({"first_byte_delay_s": 1.0},) * 3,
        stream=True,
        upstream_config={"timeout_s": 0.4},
        status=504,
        error="upstream_timeout",
        spend=ZERO,
        errors={"timeout": 3},
        retries={"timeout": 2},
    ),
    Case("slow_first_byte", ({"first_byte_delay_s": 0.3},), upstream_config={"timeout_s": 1}, min_duration_s=0.3),
    Case(
        "slow_first_byte_stream",
        ({"first_byte_delay_s": 0.3},),
        stream=True,
        upstream_config={"timeout_s": 1},
        min_duration_s=0.3,
    ),
    Case(
        "stream_cut",
        ({"cut_after_chunks": 3},),
        stream=True,
        error="upstream_error",
        spend=ESTIMATED,
        errors={"stream_cut": 1},
    ),
    # content and the dropped connection in one read: what arrived is relayed and charged (chars / 4)
    Case(
        "stream_cut_in_one_write",
        ({"cut_after_chunks": 3, "cut_in_one_write": True},),
        stream=True,
        error="upstream_error",
        spend=ESTIMATED,
        text_estimate=True,
        errors={"stream_cut": 1},
    ),
    Case(
        "stream_stalls_past_read_timeout",
        ({"chunk_delay_s": 1.0, "chunks": 5},),
        stream=True,
        upstream_config={"timeout_s": 0.4},
        error="upstream_error",
        spend=ESTIMATED,
        errors={"timeout": 1},
        cancelled_stream=True,
    ),
    Case(
        "plain_body_cut",
        ({"cut_after_chunks": 3},),
        status=502,
        error="upstream_error",
        spend=ZERO,
        errors={"broken": 1},
    ),
    # A 200 whose body is not JSON is passed through as it came (the proxy does not judge upstream bodies),
    # charged the prompt estimate and no completion.
    Case("malformed_json", ({"malformed_json": True},), spend=ESTIMATED),
    Case(
        "malformed_json_stream",
        ({"malformed_json": True},),
        stream=True,
        error="upstream_error",
        spend=ESTIMATED,
        errors={"stream_cut": 1},
    ),
    Case("bad_sse_line_stream", ({"bad_sse_line": True},), stream=True),
    Case("no_usage", ({"no_usage": True},), spend=ESTIMATED, text_estimate=True),
    Case("no_usage_stream", ({"no_usage": True},), stream=True, spend=ESTIMATED),
    Case("no_usage_stream_text_estimate", ({"no_usage": True},), stream=True, spend=ESTIMATED, text_estimate=True),
    Case(
        "client_gone_after_first_chunk",
        (SLOW_STREAM,),
        stream=True,
        client="first_chunk",
        spend=ESTIMATED,
        cancelled_stream=True,
        body={"max_tokens": 30},
    ),
    Case("client_gone_before_answer", ({"first_byte_delay_s": 2.0},), client="gives_up", spend=ZERO, metric_status=499),
    Case(
        "client_gone_before_answer_stream",
        ({"first_byte_delay_s": 2.0},),
        stream=True,
        client="gives_up",
        spend=ZERO,
        metric_status=499,
    ),
    Case(
        "client_gone_during_backoff",
        ({"status": 503, "retry_after_ms": "2000"},),
        client="gives_up",
        spend=ZERO,
        errors={"http_503": 1},
        metric_status=499,
    ),
]


# -- the setup --------------------------------------------------------------------------------------


@contextmanager
def unaccepting_listener():
    """A port whose listen backlog is full, so a new connection's SYN is dropped: a connect timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    try:
        for _ in range(16):
            filler = socket.socket()
            filler.settimeout(0.2)
            try:
                filler.connect(address)
            except TimeoutError:
                filler.close()
                break
            fillers.append(filler)
        else:
            pytest.fail("the listen backlog never filled up")
        yield f"http://127.0.0.1:{address[1]}/v1"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@contextmanager
def primary_upstream(case: Case, mock_url: str):
    """(primary upstream URL, backup URL or None) for the case."""
    if case.upstream == "unaccepting":
        with unaccepting_listener() as url:
            yield url, None
        return
    refused = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    yield {"mock": (mock_url, None), "refused": (refused, None), "refused+backup": (refused, mock_url)}[case.upstream]


def patch_for(case: Case, mock_url: str):
    def patch(data):
        data["keys"][KEY]["limits"] = {"max_parallel": 2, "tpm": KEY_REFILL_TPM, "tpm_burst": KEY_TPM}
        data["keys"][KEY]["daily_budget_usd"] = "1"
        data["teams"][TEAM]["limits"] = {"max_parallel": 10, "tpm": TEAM_TPM}
        data["teams"][TEAM]["daily_budget_usd"] = "5"
        data["upstreams"]["mock"].update(case.upstream_config)
        data["upstreams"]["probe"] = {
            **data["upstreams"]["mock"],
            "base_url": mock_url,
            "timeout_s": 5,
            "connect_timeout_s": 1,
        }
        data["models"][PROBE_MODEL] = {
            **data["models"][MODEL],
            "targets": [{"upstream": "probe", "model": "gpt-4o-mini"}],
        }

    return patch


def headers(request_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[KEY]}", "x-request-id": request_id}


# -- the client -------------------------------------------------------------------------------------


@dataclass
class Seen:
    status: int | None = None
    body: bytes = b""
    headers: httpx.Headers | None = None
    gave_up_at: float = 0.0  # monotonic time the client left, for the client-gone cases


def call(server, case: Case, request_id: str) -> Seen:
    body = {**CHAT, **case.body, **({"stream": True} if case.stream else {})}
    url = server.base_url + "/chat/completions"
    seen = Seen()
    if case.client == "gives_up":
        timeout = httpx.Timeout(10, read=CLIENT_GIVES_UP_S)
        with pytest.raises(httpx.ReadTimeout):
            if case.stream:
                with httpx.stream("POST", url, json=body, headers=headers(request_id), timeout=timeout) as r:
                    r.read()
            else:
                httpx.post(url, json=body, headers=headers(request_id), timeout=timeout)
        seen.gave_up_at = time.monotonic()
        return seen
    with httpx.stream("POST", url, json=body, headers=headers(request_id), timeout=10) as r:
        seen.status, seen.headers = r.status_code, r.headers
        if case.client == "first_chunk":
            seen.body = next(r.iter_raw())
            seen.gave_up_at = time.monotonic()
        else:
            seen.body = r.read()
    return seen


def sse_events(body: bytes) -> list[bytes]:
    return [event.removeprefix(b"data: ") for event in body.split(b"\n\n") if event.strip()]


ANSWERED = "The upstream failed: upstream 'mock' answered {}."
NO_CONNECT = "The upstream failed: could not connect to upstream 'mock'."
TIMED_OUT = "The upstream did not answer in time (upstream 'mock' timed out)."
INTERRUPTED = "The upstream stream was interrupted before it finished."
MESSAGES = {  # the error message each failing case gets, whole
    **{f"{status}_exhausted": ANSWERED.format(status) for status in (429, 500, 502, 503)},
    "503_exhausted_stream": ANSWERED.format(503),
    "connect_timeout": NO_CONNECT,
    "connection_refused": NO_CONNECT,
    "read_timeout": TIMED_OUT,
    "read_timeout_stream": TIMED_OUT,
    "malformed_json_stream": INTERRUPTED,
    "stream_cut": INTERRUPTED,
    "stream_cut_in_one_write": INTERRUPTED,
    "stream_stalls_past_read_timeout": INTERRUPTED,
    "plain_body_cut": "The upstream broke off its response.",
}


def assert_openai_error(payload: dict, case: Case) -> None:
    assert payload == openai_error(MESSAGES[case.id], "server_error", case.error)


def check_response(case: Case, seen: Seen) -> str:
    """Assert what the client saw; return the text of the answer it got (for estimates)."""
    assert seen.status == case.status, seen.body[:500]
    if case.status >= 400:
        assert seen.headers["content-type"].startswith("application/json")
        assert_openai_error(orjson.loads(seen.body), case)
        return ""
    if not case.stream:
        if case.faults and case.faults[0].get("malformed_json"):
            assert seen.body == b'{"id": "chatcmpl-mock", "choices": [', "not passed through as it came"
            return ""
        reply = orjson.loads(seen.body)
        assert reply["object"] == "chat.completion" and "error" not in reply
        return reply["choices"][0]["message"]["content"]
    assert seen.headers["content-type"].startswith("text/event-stream")
    events = sse_events(seen.body)
    if case.client == "first_chunk":
        assert events and b"chat.completion.chunk" in events[0]
        return ""
    if case.error:
        assert events[-1] != b"[DONE]" and b"[DONE]" not in events
        assert_openai_error(orjson.loads(events[-1]), case)
        events = events[:-1]
    else:
        assert events[-1] == b"[DONE]", events[-3:]
        events = events[:-1]
    if case.faults and case.faults[0].get("bad_sse_line"):
        assert b"not-json" in events, "the upstream's non-JSON line was not relayed"
        events = [event for event in events if event != b"not-json"]
    chunks = [orjson.loads(event) for event in events]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    return "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])


# -- the store, the ledger, the metrics -------------------------------------------------------------


def leftovers(r: redis.Redis) -> dict:
    held = {key: r.zcard(key) for key in PAR_KEYS}
    return {"slots": {k: v for k, v in held.items() if v}, "reservations": list(r.scan_iter(RESERVATIONS))}


def wait_settled(r: redis.Redis, recorder, request_id: str, within_s: float) -> tuple[float, object]:
    """Poll until the request is settled and nothing of it is left in Redis; (when, outcome)."""
    deadline = time.monotonic() + within_s
    while True:
        now = time.monotonic()
        mine = [o for o in recorder.outcomes if o.request_id == request_id]
        left = leftovers(r)
        if (
            mine
            and mine[-1].ticket is not None
            and mine[-1].ticket.settled
            and not left["slots"]
            and not left["reservations"]
        ):
            return now, mine[-1]
        if now > deadline:
            pytest.fail(f"not settled within {within_s} s: outcomes {len(mine)}, left in Redis {left}")
        time.sleep(0.01)


def by_label(found, name: str, label: str) -> dict[str, float]:
    counts = defaultdict(float)
    for labels, value in found[name]:
        if value:
            counts[labels[label]] += value
    return dict(counts)


# -- the matrix -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_fault(case: Case, mock_upstream, start_proxy, redis_url):
    clock = Clock()
    with primary_upstream(case, mock_upstream.url) as (url, backup):
        config = make_config(url, redis_url=redis_url, second_upstream=backup, patch=patch_for(case, mock_upstream.url))
        server, recorder = start_proxy(config, store=RedisStore.from_url(redis_url, clock_us=clock))
        r = redis.Redis.from_url(redis_url, socket_timeout=2)
        mock_upstream.add_faults(list(case.faults))
        request_id = f"fault-{case.id}"
        started = time.monotonic()
        seen = call(server, case, request_id)

        # -- slot and reservation released; promptly when the client left ----------------------------
        if case.client == "full":
            wait_settled(r, recorder, request_id, SETTLE_WAIT_S)
        else:
            released_at, _ = wait_settled(r, recorder, request_id, SETTLE_WAIT_S)
            if released_at - seen.gave_up_at >= PROMPT_RELEASE_S:
                raise SlotHeld(f"slot held {released_at - seen.gave_up_at:.2f} s after the client left")
        outcomes = [o for o in recorder.outcomes if o.request_id == request_id]
        outcome = outcomes[-1]
        mock = mock_upstream.stats()

        # -- what the client saw -------------------------------------------------------------------
        text = ""
        if case.client != "gives_up":
            text = check_response(case, seen)
            assert seen.headers["x-request-id"] == request_id
        assert time.monotonic() - started >= case.min_duration_s

        # -- what was charged ----------------------------------------------------------------------
        price = config.models[MODEL].price_per_mtok
        reported = Usage(mock["prompt_tokens"], mock["completion_tokens"], mock["cached_tokens"])
        if case.spend == REPORTED:
            assert reported.completion_tokens > 0
            assert outcome.usage == reported
        elif case.spend == ZERO:
            assert outcome.usage == Usage() and reported == Usage()
        else:  # estimated by the proxy: the mock reported nothing
            assert reported == Usage()
            assert outcome.usage.prompt_tokens > 0
        if case.text_estimate:
            assert text
            if outcome.usage.completion_tokens != estimate_text_tokens(text):
                raise EstimateOff(
                    f"{outcome.usage.completion_tokens} completion tokens charged for {text!r}, "
                    f"chars / 4 is {estimate_text_tokens(text)}"
                )
        if case.cancelled_stream:
            deadline = time.monotonic() + SETTLE_WAIT_S
            while mock_upstream.stats()["streams_cancelled"] != 1:
                assert time.monotonic() < deadline, f"the mock saw no cancellation: {mock_upstream.stats()}"
                time.sleep(0.01)
        charged = outcome.usage.total_tokens
        assert outcome.cost_micros == cost_micros(price, outcome.usage)
        assert (outcome.cost_micros > 0) == (case.spend != ZERO)

        usage = httpx.get(
            server.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
        ).json()["teams"][TEAM]
        assert usage["keys"][KEY]["spend_micros"] == usage["spend_micros"] == outcome.cost_micros
        assert usage["requests"] == 1, "settled more or less than once"
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
            outcome.usage.prompt_tokens,
            outcome.usage.completion_tokens,
        )

        # -- the token bucket was reconciled to exactly what was charged ---------------------------
        probe = httpx.post(
            server.base_url + "/chat/completions",
            json={**CHAT, "model": PROBE_MODEL, "max_tokens": 1},
            headers=headers("probe"),
            timeout=10,
        )
        assert probe.status_code == 200, probe.text
        _, probed = wait_settled(r, recorder, "probe", SETTLE_WAIT_S)
        assert probe.headers["x-ratelimit-limit-tokens"] == str(KEY_TPM)
        assert int(probe.headers["x-ratelimit-remaining-tokens"]) == KEY_TPM - charged - probed.ticket.tokens
        r.close()

        # -- metrics: the case counted once (and the probe's 200), nothing left in flight -------------
        found = samples(httpx.get(server.url + "/metrics", timeout=10).text)
        statuses = defaultdict(float, {"200": 1})  # the probe
        statuses[str(case.metric_status or case.status)] += 1
        have = {
            "requests by status": by_label(found, "llm_proxy_requests_total", "status"),
            "upstream errors by kind": by_label(found, "llm_proxy_upstream_errors_total", "kind"),
            "upstream retries by reason": by_label(found, "llm_proxy_upstream_retries_total", "reason"),
            "in flight": {labels["team"]: value for labels, value in found["llm_proxy_inflight_requests"]},
        }
        want = {
            "requests by status": dict(statuses),
            "upstream errors by kind": case.errors,
            "upstream retries by reason": case.retries,
            "in flight": {TEAM: 0},
        }
        if have != want:
            raise MetricsMiscount(f"/metrics: {have}, expected {want}")
