"""`create_app(config, ...)`: the whole proxy as one ASGI app, with no module-level state.

The `/v1/*` hot path is plain Starlette routes (FastAPI's per-route machinery costs ~0.35 ms a
request here); FastAPI serves the admin and ops API, with validation and OpenAPI docs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette import routing
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .apis import anthropic_errors
from .budgets.watch import BudgetWatch
from .config import Config, load_config
from .errors import InvalidRequest, MethodNotAllowed, NotFound, ProxyError
from .http import admin_api, me_api, models_api, ops_api, registry_api
from .http.call_request import CallRequest
from .http.responses import error_response, request_id_of
from .identity import JwksCache, JwtVerifier
from .limits.days import BudgetCalendar
from .limits.limiter import Limiter
from .limits.memory_store import MemoryStore
from .limits.response_owners import owners_for
from .limits.types import Store
from .metrics import Metrics
from .observe import Observer, Observers, RequestLog
from .registry import (
    MemoryRegistryBackend,
    RedisRegistryBackend,
    Registry,
    RegistryBackend,
    RegistryCache,
    RegistryError,
)
from .reload import Reloader
from .request.gateway import Gateway
from .request.holds import ProviderHolds
from .request.jwt_callers import JwtCallers
from .request.queue import WaitQueue, queueing_teams
from .request.runtime_keys import RuntimeKeys
from .request.settle import Settler
from .request.shared_holds import HoldSharing
from .request.stored import StoredResponses
from .snapshot import SnapshotHolder, build_snapshot

Route = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("proxy")


def build_store(config: Config) -> Store:
    if config.store.redis_url is None:
        return MemoryStore(retention_days=config.spend_retention_days)
    from .limits.redis_store import RedisStore

    return RedisStore.from_url(
        config.store.redis_url,
        timeout_ms=config.store.timeout_ms,
        cluster=config.store.is_cluster,
        retention_days=config.spend_retention_days,
    )


class ProxyApp(FastAPI):
    """FastAPI for the admin and ops API; `/v1/*` calls go straight to the gateway.

    The call routes skip FastAPI's and Starlette's middleware stack (six layers, ~18% of the CPU
    of a proxied request in a profile here) and answer every error themselves, OpenAI-shaped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.call_routes: dict[str, Route] = {}
        self.azure_route: Route | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            route = self.call_routes.get(path)
            if route is None and self.azure_route is not None and azure_call(path) is not None:
                route = self.azure_route
            if route is not None:
                await route(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


ANTHROPIC_PATH = "/v1/messages"
AZURE_PREFIX = "/openai/deployments/"
AZURE_ENDPOINTS = {"chat/completions": "chat", "embeddings": "embeddings"}


def azure_call(path: str) -> tuple[str, str] | None:
    """(deployment, endpoint) of an Azure-style path `/openai/deployments/{d}/chat/completions`
    (or `/embeddings`); None for any other path."""
    if not path.startswith(AZURE_PREFIX):
        return None
    deployment, _, rest = path[len(AZURE_PREFIX) :].partition("/")
    endpoint = AZURE_ENDPOINTS.get(rest)
    if not deployment or endpoint is None:
        return None
    return deployment, endpoint


def create_app(
    config: Config,
    *,
    store: Store | None = None,
    observer: Observer | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
    freeze_heap: bool = False,
) -> ProxyApp:
    """The app for `config`. `freeze_heap` (a served process, `app_from_env`): once the runtime
    keys are loaded at startup, they join the startup heap out of the garbage collector's sight."""
    store = store if store is not None else build_store(config)
    registry_backend = build_registry_backend(config, store)
    registry_cache = RegistryCache(registry_backend)
    runtime = RuntimeKeys(registry_cache)
    registry = Registry(
        registry_backend, config_keys=config.keys, config_teams=config.teams, on_change=registry_cache.refresh
    )
    snapshots = SnapshotHolder(build_snapshot(config, environ, runtime=runtime))
    calendar = BudgetCalendar(lambda: snapshots.config.budget_timezone, store.clock_us)
    fallback = MemoryStore(retention_days=config.spend_retention_days)
    metrics = Metrics()
    metrics.queue_teams(queueing_teams(config))
    limiter = Limiter(
        config,
        store,
        fallback=fallback,
        calendar=calendar,
        on_store_error=metrics.store_error,
        on_quota=metrics.set_quota_left,
    )
    budgets = BudgetWatch(snapshots, store, metrics, calendar)
    request_log = RequestLog(config.log_level)
    observers = Observers(request_log, metrics, *([observer] if observer else []))
    owners = owners_for(store, config.response_retention_days)
    queue = WaitQueue(metrics)
    settler = Settler(limiter, observers, budgets, freed=queue.freed)
    jwks = JwksCache(config.auth.jwt) if config.auth.jwt else None
    jwt = JwtCallers(JwtVerifier(config.auth.jwt, jwks), runtime) if config.auth.jwt and jwks else None
    holds = ProviderHolds()
    sharing = HoldSharing(store, holds, _max_hold_s(snapshots), on_store_error=metrics.store_error)
    gateway = Gateway(snapshots, settler, observers, owners, holds, jwt, queue)
    stored = StoredResponses(snapshots, settler, observers, owners, jwt)
    reloader = Reloader(
        snapshots,
        limiter,
        config_path,
        environ,
        request_log,
        on_config=lambda applied: metrics.queue_teams(queueing_teams(applied)),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for client in snapshots.current.upstreams.values():
            await client.start()
        if jwks is not None:
            await jwks.start()
        await _load_registry(registry_cache)
        if freeze_heap:  # a full collection would otherwise scan every runtime key, each time it runs
            gc.collect()
            gc.freeze()
        registry_cache.start()
        sharing.start()
        limiter.start()
        budgets.start()
        hangup = _on_sighup(reloader)
        try:
            yield
        finally:
            hangup()
            await registry_cache.stop()
            await sharing.stop()
            await budgets.close()
            await limiter.close(flush_for_s=max(1.0, snapshots.config.shutdown_grace_s))  # a reload may change it
            await reloader.close()  # after the last settlement: a request may still use a replaced client
            for client in snapshots.current.upstreams.values():
                await client.close()
            await store.close()
            await registry_backend.close()
            metrics.worker_exited()

    app = ProxyApp(
        title="llm-ratelimit-proxy",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/admin/docs",
        openapi_url="/admin/openapi.json",
        redoc_url=None,
    )
    app.state.snapshots = snapshots
    app.state.limiter = limiter
    app.state.queue = queue
    app.state.store = store
    app.state.reloader = reloader
    app.state.registry = registry
    app.state.registry_cache = registry_cache

    for path, endpoint in (
        ("/v1/chat/completions", "chat"),
        ("/v1/completions", "completions"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/responses", "responses"),
        ("/v1/messages", "messages"),
        ("/v1/messages/count_tokens", "count_tokens"),
    ):
        app.call_routes[path] = _call_route(gateway, endpoint)
        app.add_route(path, _method_not_allowed, methods=["GET", "PUT", "PATCH", "DELETE"])
    app.azure_route = _azure_route(gateway)
    for path, methods in (
        ("/v1/responses/{response_id}", ["GET", "DELETE"]),
        ("/v1/responses/{response_id}/cancel", ["POST"]),
        ("/v1/responses/{response_id}/input_items", ["GET"]),
    ):  # a starlette Route: add_route is typed for Responses only, and GET ?stream=true streams
        app.router.routes.append(routing.Route(path, stored.handle, methods=methods))
    models_api.add_routes(app, snapshots)
    me_api.add_routes(app, snapshots, store, calendar, jwt)
    app.include_router(ops_api.router(snapshots, store, metrics))
    app.include_router(admin_api.router(snapshots, store, calendar, runtime))
    app.include_router(registry_api.router(snapshots, registry, runtime))
    _install_error_handlers(app)
    return app


def build_registry_backend(config: Config, store: Store) -> RegistryBackend:
    """The registry beside the counters: Redis when the store is Redis (every replica shares it),
    else this process, its fences written into the in-process store so its admit script sees them."""
    if config.store.redis_url is not None and not isinstance(store, MemoryStore):
        return RedisRegistryBackend.from_url(
            config.store.redis_url, timeout_ms=config.store.timeout_ms, cluster=config.store.is_cluster
        )
    return MemoryRegistryBackend(fences=store.keys if isinstance(store, MemoryStore) else None)


def _max_hold_s(snapshots: SnapshotHolder) -> Callable[[str], float]:
    """An upstream's `max_hold_s` in the running config; 0 for one it does not have."""

    def max_hold_s(upstream: str) -> float:
        client = snapshots.current.upstreams.get(upstream)
        return 0.0 if client is None else float(client.config.max_hold_s)

    return max_hold_s


async def _load_registry(cache: RegistryCache) -> None:
    """Load the runtime keys before serving; a store that does not answer yet is not fatal (the
    background poll catches up, and config keys work meanwhile)."""
    try:
        await cache.refresh()
    except RegistryError as exc:
        log.warning("registry not loaded at startup (%s); retrying in the background", exc.message)


def _on_sighup(reloader: Reloader) -> Callable[[], object]:
    """Reload on SIGHUP when serving from the main thread; returns the undo."""
    if threading.current_thread() is not threading.main_thread() or reloader.path is None:
        return lambda: None
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[bool]] = set()  # the loop keeps only weak references to tasks

    def reload() -> None:
        task = loop.create_task(reloader.reload())
        running.add(task)
        task.add_done_callback(running.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError):
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def _call_route(gateway: Gateway, endpoint: str) -> Route:
    """A bare ASGI handler for one OpenAI call endpoint."""

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        request = CallRequest(scope, receive)
        response: Response | Route
        try:
            response = await gateway.handle(request, endpoint)
        except Exception:
            log.exception("unexpected error on POST %s", scope["path"])
            response = error_response(ProxyError("The proxy had an internal error."), request_id_of(request))
        await response(scope, receive, send)

    route.__name__ = f"v1_{endpoint}"
    return route


def _azure_route(gateway: Gateway) -> Route:
    """Azure-style clients: chat and embeddings, the model named as the path's deployment."""

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        request = CallRequest(scope, receive)
        found = azure_call(scope["path"])
        assert found is not None  # ProxyApp routes only Azure paths here
        deployment, endpoint = found
        response: Response | Route
        try:
            response = await gateway.handle(request, endpoint, deployment)
        except Exception:
            log.exception("unexpected error on POST %s", scope["path"])
            response = error_response(ProxyError("The proxy had an internal error."), request_id_of(request))
        await response(scope, receive, send)

    return route


async def _method_not_allowed(request: Request) -> Response:
    return _error_for(request, MethodNotAllowed(f"Method {request.method} is not allowed for {request.url.path}."))


def _error_for(request: Request, error: ProxyError) -> Response:
    """OpenAI's error shape, or Anthropic's under /v1/messages (its clients read only that)."""
    request_id = request_id_of(request)
    path = request.url.path
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        status, body, headers = anthropic_errors.anthropic_error(error, request_id)
        headers["request-id"] = headers["x-request-id"] = request_id
        return Response(body, status_code=status, headers=headers, media_type="application/json")
    return error_response(error, request_id)


def _install_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, error: ProxyError) -> Response:
        return _error_for(request, error)

    async def registry_refusal(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RegistryError)  # Starlette routes by the class registered below
        return respond(request, registry_api.registry_error(exc))

    async def proxy_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProxyError)  # Starlette routes by the class registered below
        return respond(request, exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # Starlette routes by the class registered below
        if exc.status_code == 404:
            return respond(request, NotFound(f"Unknown request URL: {request.method} {request.url.path}."))
        if exc.status_code == 405:
            return respond(request, MethodNotAllowed(f"Method {request.method} is not allowed for {request.url.path}."))
        error = ProxyError(str(exc.detail))
        error.status = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return respond(request, error)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)  # Starlette routes by the class registered below
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return respond(request, InvalidRequest(f"Invalid request: {first.get('msg', 'invalid')}.", param=param))

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        error = ProxyError("The proxy had an internal error.")
        return respond(request, error)

    app.add_exception_handler(ProxyError, proxy_error)
    app.add_exception_handler(RegistryError, registry_refusal)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def running_grace_s(app: object) -> float | None:
    """The `shutdown_grace_s` of the config the app runs *now* (a reload may have changed it), or
    None when `app` is not ours; uvicorn may have wrapped it in middleware (each keeps `.app`)."""
    for _ in range(8):
        state = getattr(app, "state", None)
        holder = getattr(state, "snapshots", None) if state is not None else None
        if isinstance(holder, SnapshotHolder):
            return float(holder.config.shutdown_grace_s)
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def app_from_env() -> ProxyApp:
    """The uvicorn factory for `llm-proxy serve` (each worker builds its own app).

    Once the app is built, the ~100k objects of the modules and the app (live as long as the
    process) are moved out of the garbage collector's sight (`gc.freeze`): a full collection no
    longer scans them, which took ~70 ms of CPU, a pause of every stream, each time one ran."""
    path = os.environ["LLM_PROXY_CONFIG"]
    app = create_app(load_config(path), config_path=path, freeze_heap=True)
    gc.collect()  # what is garbage already is not frozen
    gc.freeze()
    return app
