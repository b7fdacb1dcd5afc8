"""Health, readiness and metrics: what orchestrators and Prometheus poll."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..gateway import Gateway
from ..limits.types import Store, StoreError
from ..metrics import CONTENT_TYPE


def router(gateway: Gateway, store: Store) -> APIRouter:
    api = APIRouter(tags=["ops"])

    @api.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> Response:
        """Readiness: the rate-limit store answers."""
        try:
            await store.ping()
        except StoreError as exc:
            return JSONResponse({"status": "unavailable", "store": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready"})

    @api.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition (aggregated over workers under --workers N)."""
        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE)

    return api
