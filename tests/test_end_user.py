"""Who the end user is: the first source of `end_user_identity` the request carries."""

from __future__ import annotations

import pytest

from proxy.request.end_user import MAX_END_USER, end_user_of

ORDER = ["safety_identifier", "user", "x-proxy-end-user"]


@pytest.mark.parametrize(
    ("body", "headers", "order", "expected"),
    [
        ({"safety_identifier": "s", "user": "u"}, {"x-proxy-end-user": "h"}, ORDER, "s"),
        ({"user": "u"}, {"x-proxy-end-user": "h"}, ORDER, "u"),
        ({}, {"x-proxy-end-user": "h"}, ORDER, "h"),
        ({"user": "u"}, {"x-proxy-end-user": "h"}, ["x-proxy-end-user", "user"], "h"),
        ({"user": ""}, {}, ORDER, None),  # empty: not an identity
        ({"user": 7, "safety_identifier": None}, {}, ORDER, None),  # not a string
        ({"user": "u"}, {}, ["safety_identifier"], None),  # a source not configured is not read
        ({"user": "x" * (MAX_END_USER + 5)}, {}, ORDER, "x" * MAX_END_USER),
    ],
)
def test_end_user_of(body: dict, headers: dict, order: list[str], expected: str | None) -> None:
    assert end_user_of(body, headers, order) == expected
