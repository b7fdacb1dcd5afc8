"""Following the provider: a target that answered 429, or showed a limit at zero, is held until its
reset: the next requests go to the model's next target without touching it, or (one target) get
a 429 from the proxy without reaching the upstream; traffic resumes after the reset.

The pure parts with a pinned clock; the rest through uvicorn on a port, the mock upstream with a
quota of its own on another (two mocks for two targets), and the OpenAI and Anthropic SDKs.
"""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest

from proxy.config import Target
from proxy.mock_upstream import MockUpstream
from proxy.request.holds import ProviderHolds
from proxy.upstream.provider_limits import ProviderHold, openai_duration_s, provider_hold
from tests.support.configs import KEYS, UPSTREAM_KEY, make_config
from tests.support.errors import Matching, openai_error

NOW = 1_800_000_000.0  # the wall clock, for Anthropic's RFC 3339 resets: 2027-01-15T08:00:00Z
HELD = Matching(
    r"Rate limit reached at the provider: upstream '(mock|backup|claude)' has no requests left for '[\w.-]+' "
    r"until its limit resets, so the proxy does not send it this request\. Please try again in [\d.]+m?s\."
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("1h2m3.5s", 3723.5),
        ("59.999s", 59.999),
        ("7", 7.0),
        ("", None),
        ("banana", None),
        ("-1s", None),
        ("1x", None),
        ("nan", None),
        ("1s1h", None),
    ],
)
def test_openai_durations(text: str, seconds: float | None) -> None:
    assert openai_duration_s(text) == (None if seconds is None else pytest.approx(seconds))


OPENAI_ZERO = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"}


def anthropic_zero(reset: str) -> dict[str, str]:
    return {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": reset}


@pytest.mark.parametrize(
    ("api", "status", "headers", "hold"),
    [
        ("openai", 200, {}, None),
        ("openai", 200, {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1s"}, None),
        ("openai", 200, OPENAI_ZERO, ProviderHold(1.5, "requests")),
        (
            "openai",
            200,
            {**OPENAI_ZERO, "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"},
            ProviderHold(360.0, "tokens"),
        ),
        ("openai", 200, {"x-ratelimit-remaining-requests": "0"}, None),  # no reset: nothing to hold for
        ("openai", 200, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "soon"}, None),
        ("openai", 200, {"x-ratelimit-remaining-requests": "zero", "x-ratelimit-reset-requests": "1s"}, None),
        ("openai", 429, {}, ProviderHold(1.0, "requests")),  # says nothing: about a backoff
        ("openai", 429, {"retry-after-ms": "250", "retry-after": "1"}, ProviderHold(0.25, "requests")),
        ("openai", 429, {"retry-after": "3"}, ProviderHold(3.0, "requests")),
        ("openai", 429, {"retry-after": "Fri, 15 Jan 2027 08:00:04 GMT"}, ProviderHold(4.0, "requests")),
        ("openai", 429, {"retry-after": "0"}, None),  # try again now
        ("openai", 429, {"retry-after": "whenever", "retry-after-ms": "-5"}, ProviderHold(1.0, "requests")),
        ("openai", 429, OPENAI_ZERO, ProviderHold(1.5, "requests")),
        ("openai", 503, OPENAI_ZERO, ProviderHold(1.5, "requests")),  # any answer that shows a zero
        ("anthropic", 200, anthropic_zero("2027-01-15T08:00:05Z"), ProviderHold(5.0, "requests")),
        (
            "anthropic",
            200,
            {
                "anthropic-ratelimit-output-tokens-remaining": "0",
                "anthropic-ratelimit-output-tokens-reset": "2027-01-15T08:00:02.5+00:00",
            },
            ProviderHold(2.5, "tokens"),
        ),
        (
            "anthropic",
            200,
            anthropic_zero("2027-01-15T07:59:00Z"),
            None,  # a reset already past
        ),
        ("anthropic", 200, anthropic_zero("x"), None),
        ("anthropic", 200, OPENAI_ZERO, None),  # another API's headers are not this one's
        ("anthropic", 429, {"retry-after": "2"}, ProviderHold(2.0, "requests")),
    ],
)
def test_what_an_answer_says_about_the_providers_limits(
    api: str, status: int, headers: dict[str, str], hold: ProviderHold | None
) -> None:
    found = provider_hold(api, status, headers, NOW)
    if hold is None:
        assert found is None
    else:
        assert found is not None and (found.seconds, found.kind) == (pytest.approx(hold.seconds), hold.kind)


class PinnedClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_hold_is_per_target_capped_kept_at_its_longest_and_ends() -> None:
    clock = PinnedClock()
    holds = ProviderHolds(clock=clock, wall=lambda: NOW)
    a, b, a_other_model = (Target(upstream=u, model=m) for u, m in (("a", "m"), ("b", "m"), ("a", "n")))
    holds.follow(a, "openai", 60, 429, {"retry-after": "3600"})
    assert holds.remaining(a) == 60  # capped at max_hold_s whatever the header says
    assert holds.remaining(b) == holds.remaining(a_other_model) == 0
    holds.follow(a, "openai", 60, 429, {"retry-after": "2"})  # a shorter hold does not shorten it
    assert holds.remaining(a) == 60
    holds.follow(b, "openai", 0, 429, {"retry-after": "5"})  # max_hold_s 0: never held
    assert holds.remaining(b) == 0 and holds.any_free([a, b])
    clock.now += 59.5
    assert holds.remaining(a) == pytest.approx(0.5) and not holds.any_free([a])
    refusal = holds.refusal([a])
    assert (refusal.status, refusal.type, refusal.code) == (429, "requests", "rate_limit_exceeded")
    assert refusal.headers == {"retry-after": "1", "retry-after-ms": "500"}
    holds.refuse_if_held([a])  # half a second: waited out, not refused before admission
    clock.now += 0.5
    assert holds.remaining(a) == 0


# -- through the proxy ----------------------------------------------------------------------------
@pytest.fixture
def backup():
    with MockUpstream() as mock:
        yield mock


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS["alice"], max_retries=0, timeout=10)


def ask(server):
    return sdk(server).chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )


def signal_empty_window(mock: MockUpstream, how: str, reset_s: float) -> int:
    """Make `mock` tell the proxy its window is empty; returns the requests it answers meanwhile."""
    if how == "429":
        mock.add_faults([{"status": 429, "retry_after_ms": str(int(reset_s * 1000))}])
        return 0
    mock.set_quota(1, reset_s)  # the first answer shows remaining 0
    return 1


@pytest.mark.parametrize("how", ["429", "remaining_zero"])
def test_a_held_target_is_skipped_for_the_next_until_its_reset(mock_upstream, backup, start_proxy, how):
    reset_s = 2.0
    server, _ = start_proxy(make_config(mock_upstream.url, second_upstream=backup.url))
    served = signal_empty_window(mock_upstream, how, reset_s)
    first = ask(server)
    signalled = time.monotonic()  # the hold began before: it ends before signalled + reset_s
    assert first.http_response.status_code == 200
    assert first.parse().model == ("gpt-4o" if how == "429" else "gpt-4o-mini")  # the 429 went on to the backup
    for _ in range(4):
        reply = ask(server)
        assert reply.parse().model == "gpt-4o"  # the backup's model: the first target is held
    assert len(mock_upstream.requests) == 1 and len(backup.requests) == 5 - served
    assert mock_upstream.stats()["rate_limited"] == 0
    time.sleep(max(0.0, signalled + reset_s + 0.1 - time.monotonic()))
    assert ask(server).parse().model == "gpt-4o-mini"  # the reset came: back to the first target
    assert len(mock_upstream.requests) == 2 and len(backup.requests) == 5 - served


@pytest.mark.parametrize("how", ["429", "remaining_zero"])
def test_with_one_target_the_proxy_answers_429_without_sending(mock_upstream, start_proxy, how):
    reset_s = 3.0
    server, recorder = start_proxy(make_config(mock_upstream.url))
    served = signal_empty_window(mock_upstream, how, reset_s)
    if served:
        assert ask(server).http_response.status_code == 200
    for _ in range(3):
        with pytest.raises(openai.RateLimitError) as refused:
            ask(server)
        response = refused.value.response
        assert response.json() == openai_error(HELD, "requests", "rate_limit_exceeded")
        assert 0 < int(response.headers["retry-after-ms"]) <= reset_s * 1000
        assert 1 <= int(response.headers["retry-after"]) <= reset_s
    signalled = time.monotonic()  # the hold began before: it ends before signalled + reset_s
    assert len(mock_upstream.requests) == 1  # the one that told: none of the refused reached it
    assert mock_upstream.stats()["rate_limited"] == 0
    server.wait_settled()
    assert [o.rejection for o in recorder.outcomes if o.status == 429] == ["upstream"] * 3
    time.sleep(max(0.0, signalled + reset_s + 0.1 - time.monotonic()))
    assert ask(server).http_response.status_code == 200
    assert len(mock_upstream.requests) == 2


def test_garbage_headers_are_ignored_and_a_hold_is_capped(mock_upstream, start_proxy):
    def cap(data: dict) -> None:
        data["upstreams"]["mock"]["max_hold_s"] = 1.5

    server, _ = start_proxy(make_config(mock_upstream.url, patch=cap))
    garbage = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "banana", "retry-after": "soon"}
    mock_upstream.add_faults([{"status": 429, "headers": garbage}, {"headers": garbage}])
    assert ask(server).http_response.status_code == 200  # the 429's 1 s default hold, waited out
    assert ask(server).http_response.status_code == 200  # a zero with an unreadable reset: no hold
    assert len(mock_upstream.requests) == 3
    mock_upstream.add_faults([{"headers": {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "9999h"}}])
    assert ask(server).http_response.status_code == 200
    held_at = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        ask(server)
    assert refused.value.response.json()["error"]["type"] == "tokens"
    assert int(refused.value.response.headers["retry-after-ms"]) <= 1500  # max_hold_s, not 9999 hours
    time.sleep(max(0.0, held_at + 1.6 - time.monotonic()))
    assert ask(server).http_response.status_code == 200
    assert len(mock_upstream.requests) == 5


def test_an_anthropic_upstream_is_followed_by_its_own_headers(mock_upstream, start_proxy):
    def claude(data: dict) -> None:
        data["upstreams"]["claude"] = {
            "base_url": mock_upstream.url.removesuffix("/v1"),
            "api": "anthropic",
            "api_key": UPSTREAM_KEY,
            "max_retries": 2,
        }
        data["models"]["claude-model"] = {"targets": [{"upstream": "claude", "model": "claude-sonnet-4-6"}]}

    server, _ = start_proxy(make_config(mock_upstream.url, patch=claude))
    mock_upstream.set_quota(1, 3.0)  # its answer: anthropic-ratelimit-requests-remaining 0, an RFC 3339 reset
    client = anthropic.Anthropic(base_url=server.url, api_key=KEYS["alice"], max_retries=0, timeout=10)

    def message():
        return client.messages.create(model="claude-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}])

    assert message().model == "claude-sonnet-4-6"
    with pytest.raises(anthropic.RateLimitError) as refused:
        message()
    body = refused.value.response.json()
    assert (body["type"], body["error"]["type"], body["error"]["message"]) == ("error", "rate_limit_error", HELD)
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 3
    assert len(mock_upstream.requests) == 1 and mock_upstream.stats()["rate_limited"] == 0


def test_without_following_the_mock_quota_answers_429(mock_upstream, start_proxy):
    """The contrast (`max_hold_s: 0`): the proxy sends into the empty window and the provider
    refuses; the proxy retries those 429s (each retry another request into the window)."""

    def off(data: dict) -> None:
        data["upstreams"]["mock"]["max_hold_s"] = 0
        data["upstreams"]["mock"]["max_retries"] = 0

    server, _ = start_proxy(make_config(mock_upstream.url, patch=off))
    mock_upstream.set_quota(1, 30.0)
    assert ask(server).http_response.status_code == 200
    raw = httpx.post(
        server.base_url + "/chat/completions",
        json={"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {KEYS['alice']}"},
        timeout=10,
    )
    assert raw.status_code == 502 and json.loads(raw.content)["error"]["code"] == "upstream_error"
    assert mock_upstream.stats()["rate_limited"] == 1
