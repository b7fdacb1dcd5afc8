"""`GET /v1/models` and `GET /v1/models/{id}`: the models this key may use, as OpenAI lists them."""

from __future__ import annotations

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ModelNotFound, ProxyError
from ..request.authenticate import presented_key
from ..snapshot import SnapshotHolder
from .responses import error_response, request_id_of

CREATED = 1_700_000_000
OWNER = "llm-ratelimit-proxy"


def _model(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": CREATED, "owned_by": OWNER}


def add_routes(app: Starlette, snapshots: SnapshotHolder) -> None:
    async def list_models(request: Request) -> Response:
        snapshot = snapshots.current
        try:
            caller = snapshot.keyring.authenticate(presented_key(request.headers))
        except ProxyError as error:
            return error_response(error, request_id_of(request))
        data = [_model(name) for name in snapshot.config.models if caller.may_use(name)]
        return Response(
            orjson.dumps({"object": "list", "data": data}),
            media_type="application/json",
            headers={"x-request-id": request_id_of(request)},
        )

    async def get_model(request: Request) -> Response:
        name = request.path_params["model_id"]
        snapshot = snapshots.current
        try:
            caller = snapshot.keyring.authenticate(presented_key(request.headers))
            if name not in snapshot.config.models or not caller.may_use(name):
                raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        except ProxyError as error:
            return error_response(error, request_id_of(request))
        return Response(
            orjson.dumps(_model(name)), media_type="application/json", headers={"x-request-id": request_id_of(request)}
        )

    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
