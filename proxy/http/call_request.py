"""The request object of a proxied call: Starlette's `Request` whose headers are indexed once.

Starlette's `Headers` finds a header by scanning every header the client sent, lower-casing and
encoding the name each time, and raises `KeyError` (caught by `Mapping.get`) for a missing one. A
call reads about six headers (its id, key, content length, deadline, tags, end user), most of them
absent, so each request indexes its headers once instead: the first value of each name wins, as
with `Headers`. Everything else (`getlist`, `items`, `raw`, mutation-free use) is Starlette's own.
"""

from __future__ import annotations

from typing import TypeVar, overload

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Receive, Scope

T = TypeVar("T")


class IndexedHeaders(Headers):
    def __init__(self, scope: Scope) -> None:
        super().__init__(scope=scope)
        # reversed: the first of several headers of one name wins, as in Headers.__getitem__; raw
        # bytes (ASGI names are lower-case), decoded only when looked up
        self._index = dict(reversed(self._list))

    def __getitem__(self, key: str) -> str:
        return self._index[key.lower().encode("latin-1")].decode("latin-1")

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower().encode("latin-1") in self._index

    @overload
    def get(self, key: str, /) -> str | None: ...

    @overload
    def get(self, key: str, default: str, /) -> str: ...

    @overload
    def get(self, key: str, default: T, /) -> str | T: ...

    def get(self, key: str, default: object = None, /) -> object:
        value = self._index.get(key.lower().encode("latin-1"))
        return default if value is None else value.decode("latin-1")


class CallRequest(Request):
    def __init__(self, scope: Scope, receive: Receive) -> None:
        super().__init__(scope, receive)
        self._headers = IndexedHeaders(scope)
