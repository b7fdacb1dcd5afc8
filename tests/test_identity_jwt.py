"""JWTs from the organisation's identity provider: keys made here, served by a real JWKS
endpoint on a local port (or a file), verified by `JwtVerifier`. Each refusal says why and never
holds the token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.config import JwtAuth, parse_config
from proxy.identity import JwksCache, JwtVerifier, TokenRejected, looks_like_jwt
from proxy.identity.jwt_verify import LEEWAY_S

ISSUER = "https://idp.example.com/"
AUDIENCE = "llm-proxy"


class Signer:
    """A private key and its public JWK, under `kid`."""

    def __init__(self, kid: str, kind: str) -> None:
        self.kid = kid
        if kind == "rsa":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.algorithm = "RS256"
            self.jwk = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.algorithm = "ES256"
            self.jwk = json.loads(ECAlgorithm.to_jwk(self.private.public_key()))
        self.jwk["kid"] = kid

    def sign(self, algorithm: str | None = None, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "exp": now + 300,
            "nbf": now - 5,
            "team": "platform",
            "sub": "alice@example.com",
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(
            claims, self.private, algorithm=algorithm or self.algorithm, headers={"kid": self.kid, **(headers or {})}
        )


class JwksServer:
    """A real HTTP endpoint on 127.0.0.1 serving `keys` as a JWKS document; counts its requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rsa_signer() -> Signer:
    return Signer("rsa-1", "rsa")


@pytest.fixture(scope="module")
def ec_signer() -> Signer:
    return Signer("ec-1", "ec")


def config(url: str | None = None, file: str | None = None) -> JwtAuth:
    return JwtAuth(issuer=ISSUER, audience=AUDIENCE, jwks_url=url, jwks_file=file, team_claim="team", user_claim="sub")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def verifier_for(server: JwksServer, clock: FakeClock | None = None) -> tuple[JwtVerifier, JwksCache]:
    cache = JwksCache(config(server.url), clock=clock or FakeClock())
    await cache.start()
    return JwtVerifier(config(server.url), cache), cache


async def rejected(verifier: JwtVerifier, token: str) -> TokenRejected:
    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)
    assert token not in caught.value.message
    for segment in token.split("."):
        if segment:
            assert segment not in caught.value.message
    return caught.value


async def test_rs256_and_es256_tokens_name_team_and_user(jwks_server, rsa_signer, ec_signer):
    jwks_server.keys = [rsa_signer.jwk, ec_signer.jwk]
    verifier, _ = await verifier_for(jwks_server)
    for signer in (rsa_signer, ec_signer):
        identity = await verifier.verify(signer.sign())
        assert (identity.team, identity.user) == ("platform", "alice@example.com")


async def test_known_kid_costs_no_fetch(jwks_server, rsa_signer):
    jwks_server.keys = [rsa_signer.jwk]
    verifier, cache = await verifier_for(jwks_server)
    for _ in range(20):
        await verifier.verify(rsa_signer.sign())
    assert jwks_server.requests == 1 and cache.fetches == 1


async def test_rotation_new_kid_is_verified_after_one_refresh(jwks_server, rsa_signer):
    jwks_server.keys = [rsa_signer.jwk]
    clock = FakeClock()
    verifier, _ = await verifier_for(jwks_server, clock)
    rotated = Signer("rsa-2", "rsa")
    jwks_server.keys = [rsa_signer.jwk, rotated.jwk]  # the IdP publishes its next key
    clock.now += 60
    assert (await verifier.verify(rotated.sign())).team == "platform"
    assert jwks_server.requests == 2


async def test_unknown_kids_refresh_at_most_once_per_interval(jwks_server, rsa_signer):
    jwks_server.keys = [rsa_signer.jwk]
    clock = FakeClock()
    verifier, cache = await verifier_for(jwks_server, clock)
    stranger = Signer("made-up", "rsa")
    clock.now += 60
    for i in range(50):
        error = await rejected(verifier, stranger.sign(headers={"kid": f"made-up-{i}"}))
        assert error.reason == "unknown_key"
    assert jwks_server.requests == 2  # the start, and one refresh for the whole flood
    clock.now += 10  # past the interval: one more refresh, which finds the rotated key
    jwks_server.keys = [rsa_signer.jwk, stranger.jwk]
    assert (await verifier.verify(stranger.sign())).user == "alice@example.com"
    assert jwks_server.requests == 3 and cache.fetches == 3


async def test_expired_and_not_yet_valid_beyond_the_leeway(jwks_server, rsa_signer):
    jwks_server.keys = [rsa_signer.jwk]
    verifier, _ = await verifier_for(jwks_server)
    now = int(time.time())
    assert (await rejected(verifier, rsa_signer.sign(exp=now - LEEWAY_S - 5))).reason == "expired"
    assert (await rejected(verifier, rsa_signer.sign(nbf=now + LEEWAY_S + 60))).reason == "not_yet_valid"
    await verifier.verify(rsa_signer.sign(exp=now - 1))  # within the leeway: clock skew


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"aud": "someone-else"}, "wrong_audience"),
        ({"iss": "https://evil.example.com/"}, "wrong_issuer"),
        ({"exp": None}, "missing_claim"),
        ({"aud": None}, "missing_claim"),
        ({"team": None}, "missing_claim"),
        ({"sub": ""}, "missing_claim"),
        ({"team": ["a", "b"]}, "missing_claim"),
    ],
)
async def test_claims_are_checked(jwks_server, rsa_signer, claims, reason):
    jwks_server.keys = [rsa_signer.jwk]
    verifier, _ = await verifier_for(jwks_server)
    assert (await rejected(verifier, rsa_signer.sign(**claims))).reason == reason


async def test_alg_none_is_refused(jwks_server, rsa_signer):
    jwks_server.keys = [rsa_signer.jwk]
    verifier, _ = await verifier_for(jwks_server)
    good = rsa_signer.sign()
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": "rsa-1", "typ": "JWT"}).encode())
    unsigned = header.rstrip(b"=").decode() + "." + good.split(".")[1] + "."
    assert looks_like_jwt(unsigned)
    assert (await rejected(verifier, unsigned)).reason == "unsupported_algorithm"


async def test_hs256_with_the_public_key_as_secret_is_refused(jwks_server, rsa_signer):
    """Algorithm confusion: an HMAC keyed with the published RSA key must not verify."""
    jwks_server.keys = [rsa_signer.jwk]
    verifier, _ = await verifier_for(jwks_server)
    public_pem = rsa_signer.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "team": "platform", "sub": "mallory"}

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (
        b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
        + "."
        + b64(json.dumps(claims).encode())
    )
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{b64(mac)}"
    assert (await rejected(verifier, forged)).reason == "unsupported_algorithm"


async def test_a_token_must_use_its_keys_algorithm(jwks_server, rsa_signer, ec_signer):
    """An ES256 token naming an RSA key's kid (or the reverse) is refused before any verification."""
    jwks_server.keys = [rsa_signer.jwk, ec_signer.jwk]
    verifier, _ = await verifier_for(jwks_server)
    token = ec_signer.sign(headers={"kid": rsa_signer.kid})
    assert (await rejected(verifier, token)).reason == "unsupported_algorithm"


async def test_bad_signature_and_malformed(jwks_server, rsa_signer):
    jwks_server.keys = [rsa_signer.jwk]
    verifier, _ = await verifier_for(jwks_server)
    impostor = Signer("rsa-1", "rsa")  # same kid, another private key
    assert (await rejected(verifier, impostor.sign())).reason == "bad_signature"
    head, body, signature = rsa_signer.sign().split(".")
    assert (await rejected(verifier, f"{head}.{body}x.{signature}")).reason in ("bad_signature", "malformed")
    assert (await rejected(verifier, "eyJub3QganNvbg.e30.")).reason == "malformed"
    no_kid = jwt.encode({"iss": ISSUER}, rsa_signer.private, algorithm="RS256")
    assert (await rejected(verifier, no_kid)).reason == "malformed"


async def test_jwks_file(tmp_path: Path, ec_signer):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [ec_signer.jwk, {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}]}))
    cache = JwksCache(config(file=str(path)))
    await cache.start()
    verifier = JwtVerifier(config(file=str(path)), cache)
    assert (await verifier.verify(ec_signer.sign())).team == "platform"
    assert cache.known("hmac") is None  # a symmetric key is never a verification key


async def test_unreachable_idp_keeps_the_keys_it_had(jwks_server, rsa_signer):
    jwks_server.keys = [rsa_signer.jwk]
    clock = FakeClock()
    verifier, cache = await verifier_for(jwks_server, clock)
    jwks_server.stop()
    clock.now += 60
    assert await cache.refresh() is False
    assert (await verifier.verify(rsa_signer.sign())).team == "platform"
    jwks_server.httpd = ThreadingHTTPServer(("127.0.0.1", 0), jwks_server.httpd.RequestHandlerClass)
    jwks_server.thread = threading.Thread(target=jwks_server.httpd.serve_forever, daemon=True)
    jwks_server.thread.start()


def test_looks_like_jwt_tells_tokens_from_proxy_keys(rsa_signer):
    assert looks_like_jwt(rsa_signer.sign())
    for not_a_token in ("sk-proxy-abc.def.ghi", "sk-proxy-" + "a" * 43, "eyJhbGc", "a.b.c", "eyJ.a.b.c", ""):
        assert not looks_like_jwt(not_a_token)


def test_auth_jwt_config_needs_one_jwks_source():
    base = {
        "upstreams": {"u": {"base_url": "http://x"}},
        "models": {"m": {"targets": [{"upstream": "u", "model": "m"}]}},
    }
    jwt_block = {"issuer": ISSUER, "audience": AUDIENCE, "team_claim": "team", "user_claim": "email"}
    parsed = parse_config({**base, "auth": {"jwt": {**jwt_block, "jwks_url": "https://idp/jwks"}}})
    assert parsed.auth.jwt is not None and parsed.auth.jwt.user_claim == "email"
    from proxy.config import ConfigError

    for bad in ({**jwt_block}, {**jwt_block, "jwks_url": "https://a", "jwks_file": "/b"}):
        with pytest.raises(ConfigError) as caught:
            parse_config({**base, "auth": {"jwt": bad}})
        assert caught.value.problems == ["auth.jwt: exactly one of jwks_url or jwks_file is required"]
    with pytest.raises(ConfigError) as caught:
        parse_config({**base, "auth": {"jwt": {**jwt_block, "jwks_file": "/b", "secret": "x"}}})
    assert caught.value.problems == ["auth.jwt.secret: unknown field"]


async def test_a_verified_token_is_remembered_until_it_expires(jwks_server, rsa_signer, monkeypatch):
    jwks_server.keys = [rsa_signer.jwk]
    cache = JwksCache(config(jwks_server.url))
    await cache.start()
    clock = FakeClock()
    clock.now = time.time()
    verifier = JwtVerifier(config(jwks_server.url), cache, clock=clock)
    token = rsa_signer.sign(exp=int(clock.now) + 60)
    await verifier.verify(token)
    decoded: list[str] = []
    original = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: decoded.append("x") or original(*a, **k))
    for _ in range(5):
        assert (await verifier.verify(token)).team == "platform"
    assert decoded == []  # no signature check again
    clock.now += 60 + LEEWAY_S + 1
    assert (await rejected(verifier, token)).reason == "expired"
