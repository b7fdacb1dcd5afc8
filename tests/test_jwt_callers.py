"""Identity from JWTs through the whole proxy: tokens signed by a test key and served from a local
JWKS endpoint; team limits and budgets and the team's end-user budget apply without a proxy key;
key rotation at the identity provider, expiry, wrong audience and an unknown team are refused with
a message that says why and never echoes the token."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from proxy.identity.jwks import MIN_REFRESH_INTERVAL_S
from tests.support.configs import ADMIN_KEY, make_config
from tests.test_identity_jwt import AUDIENCE, ISSUER, JwksServer, Signer

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("idp-1", "rsa")


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.stop()


@pytest.fixture
def server(mock_upstream, start_proxy, jwks_server: JwksServer, signer: Signer):
    jwks_server.keys = [signer.jwk]

    def patch(data: dict) -> None:
        data["auth"] = {
            "jwt": {
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "jwks_url": jwks_server.url,
                "team_claim": "team",
                "user_claim": "sub",
            }
        }
        # each end user of platform: 20 micro-dollars a day (one call costs 11, reserves 14)
        data["teams"]["platform"]["end_users"] = {"daily_budget_usd": "0.000020"}
        data["teams"]["platform"]["limits"] = {"rpm": 100}
        data["teams"]["platform"]["daily_budget_usd"] = "1"

    server, _ = start_proxy(make_config(mock_upstream.url, patch=patch))
    return server


def chat(server, token: str) -> httpx.Response:
    return httpx.post(
        server.base_url + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def refusal(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["message"]


def test_a_token_is_a_caller_of_its_team_and_end_user_budgets_apply(server, signer):
    token = signer.sign(sub="ana@example.com")
    client = openai.OpenAI(base_url=server.base_url, api_key=token, max_retries=0)
    assert client.chat.completions.create(**CHAT).choices
    with pytest.raises(openai.RateLimitError) as caught:  # ana's own day budget: 11 spent + 14 > 20
        client.chat.completions.create(**CHAT)
    assert caught.value.code == "insufficient_quota"
    assert chat(server, signer.sign(sub="bo@example.com")).status_code == 200  # another end user: its own budget
    server.wait_settled()
    me = httpx.get(server.base_url + "/me", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert (me["team"], me["end_user"], me["name"]) == ("platform", "ana@example.com", "user:ana@example.com")
    assert me["limits"]["team"]["rpm"]["limit"] == 100
    assert [w["spent_micros"] for w in me["budgets"] if w["scope"] == "key"] == [11]
    assert [w["spent_micros"] for w in me["budgets"] if w["scope"] == "team"] == [22]
    usage = httpx.get(server.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    tags = usage.json()["teams"]["platform"]["tags"]  # the token's user is the request's end user
    assert tags["user=ana@example.com"]["requests"] == 1 and tags["user=bo@example.com"]["requests"] == 1


def test_a_rotated_signing_key_is_picked_up(server, jwks_server):
    rotated = Signer("idp-2", "ec")
    jwks_server.keys = [*jwks_server.keys, rotated.jwk]  # the provider publishes the new key
    token = rotated.sign(sub="cy@example.com")
    # an unknown kid reloads the key set, at most once per MIN_REFRESH_INTERVAL_S (5 s) since the last load
    deadline = time.monotonic() + MIN_REFRESH_INTERVAL_S + 2
    while (status := chat(server, token).status_code) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"exp": int(time.time()) - 3600}, (401, "invalid_api_key", "Invalid token: The token has expired.")),
        (
            {"aud": "someone-else"},
            (401, "invalid_api_key", "Invalid token: The token is not meant for this proxy (wrong audience)."),
        ),
        ({"team": "ghosts"}, (403, "unknown_team", "The token's team 'ghosts' is not a team of this proxy.")),
    ],
)
def test_refused_tokens_say_why_without_echoing_the_token(server, signer, claims, expected):
    token = signer.sign(**claims)
    response = chat(server, token)
    assert refusal(response) == expected
    for segment in token.split("."):
        assert segment not in response.text


def test_a_runtime_team_and_its_end_user_defaults_serve_tokens(server, signer):
    token = signer.sign(team="lab", sub="di@example.com")
    assert refusal(chat(server, token))[:2] == (403, "unknown_team")
    created = httpx.post(
        server.url + "/admin/teams",
        json={"name": "lab", "end_user_defaults": {"budgets": {"daily_usd": "0.000020"}}},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    assert chat(server, token).status_code == 200
    assert refusal(chat(server, token))[:2] == (429, "insufficient_quota")  # di's own day budget
    assert chat(server, signer.sign(team="lab", sub="ed@example.com")).status_code == 200
