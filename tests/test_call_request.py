"""The proxied call's indexed headers answer every lookup exactly as Starlette's Headers do."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.datastructures import Headers

from proxy.http.call_request import CallRequest, IndexedHeaders

NAMES = st.sampled_from([b"authorization", b"x-request-id", b"content-length", b"x-proxy-tags", b"accept", b"x-a"])
VALUES = st.binary(max_size=8).map(lambda raw: raw.decode("latin-1").encode("latin-1"))
ASKED = ["Authorization", "authorization", "X-Request-Id", "content-length", "x-proxy-tags", "missing", "X-A"]


@given(st.lists(st.tuples(NAMES, VALUES), max_size=8))
def test_lookups_agree_with_starlettes_headers(raw):
    ours, theirs = IndexedHeaders({"headers": list(raw)}), Headers(raw=list(raw))
    for name in ASKED:
        assert ours.get(name) == theirs.get(name)
        assert ours.get(name, "default") == theirs.get(name, "default")
        assert (name in ours) == (name in theirs)
        if name in theirs:
            assert ours[name] == theirs[name]
        else:
            with pytest.raises(KeyError):
                ours[name]
    assert ours.getlist("x-a") == theirs.getlist("x-a")
    assert list(ours.items()) == list(theirs.items())


def test_the_first_of_repeated_headers_wins():
    request = CallRequest({"type": "http", "headers": [(b"x-a", b"1"), (b"x-a", b"2")]}, None)
    assert (request.headers["X-A"], request.headers.getlist("x-a")) == ("1", ["1", "2"])
