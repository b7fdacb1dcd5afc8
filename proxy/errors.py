"""Every error the proxy answers with, shaped as OpenAI shapes its own.

    ProxyError                      {"error": {"message", "type", "param", "code"}}
    ├── InvalidRequest      400     invalid_request_error
    │   └── ContextLengthExceeded   400 context_length_exceeded
    ├── InvalidApiKey       401     invalid_api_key
    ├── AdminRequired       403     admin key required
    ├── ModelNotAllowed     403     model_not_allowed
    ├── NotFound            404     model_not_found / unknown route
    ├── BodyTooLarge        413
    ├── ClientClosedRequest 499     the client left mid-body (nginx's code; nobody reads the answer)
    ├── RateLimited         429     type requests | tokens | parallel_requests
    ├── BudgetExceeded      429     insufficient_quota, never retried
    ├── UpstreamError       502     upstream_error
    ├── StoreUnavailable    503     store_unavailable
    └── UpstreamTimeout     504     upstream_timeout
"""

from __future__ import annotations

import orjson


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return orjson.dumps(self.body())


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class InvalidApiKey(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class AdminRequired(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "admin_key_required"


class ModelNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ClientClosedRequest(ProxyError):
    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class RateLimited(ProxyError):
    """429 for a request, token or parallel bucket; `type` is set per refusal."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit_type: str, headers: dict[str, str] | None = None):
        super().__init__(message, headers=headers)
        self.type = limit_type


class BudgetExceeded(ProxyError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(ProxyError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class StoreUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "store_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"
