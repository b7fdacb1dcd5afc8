"""Health, readiness and metrics: what orchestrators and Prometheus poll."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..errors import StoreError
from ..limits.types import Store
from ..metrics import CONTENT_TYPE, Metrics
from ..snapshot import SnapshotHolder


def router(snapshots: SnapshotHolder, store: Store, prometheus: Metrics) -> APIRouter:
    api = APIRouter(tags=["ops"])

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> Response:
        """Readiness: the rate-limit store answers. While it does not, `on_redis_error: allow`
        still serves through the fallback limiter (200, degraded); `deny` is not ready (503)."""
        try:
            await store.ping()
        except StoreError:
            if snapshots.config.store.on_redis_error == "allow":
                return JSONResponse({"status": "degraded", "store": "unavailable"})
            return JSONResponse({"status": "unavailable", "store": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @api.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition (aggregated over workers under --workers N)."""
        return Response(prometheus.exposition(), media_type=CONTENT_TYPE)

    return api
