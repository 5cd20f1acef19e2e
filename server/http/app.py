"""The HTTP side (FastAPI): health, inspection JSON, snapshot download, Prometheus metrics, the
dashboard, and a few operations, all through the operations layer (operations.py) that the
gRPC side uses too: this module only translates requests, replies and errors.

Who may call what is the operations layer's check (`Operations.guard`, server/auth): each route
passes the caller's `Authorization: Bearer <token>` and its name in server/auth/policy.py's
ACTIONS table. With `--auth-file`, every route but health and the dashboard's page needs a
principal (or the file's [anonymous] grants), the lists show only the models it may read, and a
model it may not read is 404. With `--token-file` only, health, metrics, the model list and each
model's summary and step history stay open, as before; what reveals weights (per-parameter
statistics: the norm of a one-element parameter is |w|; the snapshot download) and every change
need the token. docs/security.md gives the reasons. The
OpenAPI schema declares every status each route answers, with the error body. Every error, ours or the framework's
(unknown route, bad body), answers with the same JSON body: {"error": kind, "message": ...}.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from adamd.server.auth import Caller
from adamd.server.config import adamd_version
from adamd.server.errors import InvalidArgument, ServerError
from adamd.server.http import views
from adamd.server.http.metrics import Metrics
from adamd.server.operations import Operations

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
_STATUS_KIND = {
    400: "InvalidArgument",
    401: "Unauthenticated",
    403: "PermissionDenied",
    404: "NotFound",
    405: "NotAllowed",
}


FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class Hyperparams(BaseModel):
    """New values for one param group; fields left out keep their value."""

    model_config = ConfigDict(extra="forbid")
    # Strict (true is not 1.0) and finite (JSON Infinity, NaN and 1e999 are refused): 400.
    lr: float | None = Field(
        None, description="learning rate", examples=[0.001], strict=True, allow_inf_nan=False
    )
    betas: tuple[FiniteFloat, FiniteFloat] | None = Field(None, description="(beta1, beta2)")
    eps: float | None = Field(None, strict=True, allow_inf_nan=False)
    weight_decay: float | None = Field(None, strict=True, allow_inf_nan=False)


class ErrorBody(BaseModel):
    """What every error answers, ours or the framework's."""

    error: str = Field(description="the error kind (as the gRPC side's adamd-error)")
    message: str
    status: int


_DESCRIPTIONS = {
    400: "Invalid argument (bad path, query or body)",
    401: "Missing or unknown token (only when the server has access control)",
    403: "The caller's grants do not give the role this route needs",
    404: "No such model",
    409: "Conflict with the model's state",
    413: "Over a server limit",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in codes}


def error_body(kind: str, message: str, status: int) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        {"error": kind, "message": message, "status": status}, status_code=status, headers=headers
    )


def _caller(request: Request) -> Caller:
    """The request's credentials. A client certificate (--tls-client-ca) only admits the
    connection here: uvicorn does not hand it to the app, so HTTP principals use tokens."""
    return Caller.of(request.headers.get("authorization"))


CallerDep = Annotated[Caller, Depends(_caller)]


def create_app(ops: Operations, prometheus: Metrics | None = None) -> FastAPI:
    """The app over `ops`; `/metrics` renders `prometheus` (empty without)."""
    app = FastAPI(
        title="adamd",
        description="Optimizer-as-a-service: inspection, metrics, dashboard and operations. "
        "With access control (--auth-file, --token-file), send `Authorization: Bearer <token>`;"
        " docs/security.md lists the role each route needs.",
        version=adamd_version(),
    )
    _error_handlers(app)
    app.openapi = lambda: _honest_openapi(app)  # type: ignore[method-assign]
    _health_routes(app, ops, prometheus)
    _inspection_routes(app, ops)
    _operation_routes(app, ops)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _error_handlers(app: FastAPI) -> None:
    """One place maps every error, ours or the framework's, to the JSON error body."""

    @app.exception_handler(ServerError)
    def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        return error_body(exc.kind, str(exc), exc.http_status)

    @app.exception_handler(StarletteHTTPException)
    def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and exc.detail == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_body(_STATUS_KIND.get(exc.status_code, "HTTPError"), message, exc.status_code)

    @app.exception_handler(RequestValidationError)
    def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_body("InvalidArgument", "; ".join(parts), 400)

    @app.exception_handler(Exception)
    def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_body("Internal", f"{type(exc).__name__}: {exc}", 500)


def _health_routes(app: FastAPI, ops: Operations, prometheus: Metrics | None) -> None:
    unready: dict[int | str, dict[str, Any]] = {
        503: {"description": "Not serving yet, or stopping"}
    }

    @app.get("/healthz", tags=["health"], summary="Liveness", responses=unready)
    def healthz() -> Any:
        if not ops.facts.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: gRPC serving, models restored",
        responses=unready,
    )
    def readyz() -> Any:
        ready = ops.facts.ready
        body = {"status": "ready" if ready else "not ready", "models": len(ops.models())}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics (text format)",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(401, 403),
        },
    )
    def metrics(caller: CallerDep) -> Response:
        ops.check(caller, "GET /metrics")
        text = prometheus.render() if prometheus is not None else b""
        return Response(text, media_type=CONTENT_TYPE_LATEST)


def _inspection_routes(app: FastAPI, ops: Operations) -> None:
    stats = ops.stats
    assert stats is not None, "the HTTP side needs the daemon's step statistics"

    @app.get(
        "/v1/models",
        tags=["inspect"],
        summary="The server and every model the caller may read, briefly",
        responses=_errors(401),
    )
    def list_models(caller: CallerDep) -> Any:
        models = ops.readable(caller, "GET /v1/models")
        return {
            "server": ops.server_info(),
            "models": [views.model_summary(m, stats.get(m)) for m in models],
        }

    @app.get(
        "/v1/models/{model}",
        tags=["inspect"],
        summary="One model with its param groups",
        responses=_errors(401, 403, 404),
    )
    def describe(model: str, caller: CallerDep) -> Any:
        ops.check(caller, "GET /v1/models/{model}", model)
        m = ops.model(model)
        return views.model_summary(m, stats.get(m), detail=True)

    @app.get(
        "/v1/models/{model}/params",
        tags=["inspect"],
        summary="Per-parameter statistics (norms: needs the token when the server has one)",
        responses=_errors(401, 403, 404),
    )
    def params(model: str, caller: CallerDep) -> Any:
        # a one-element parameter's norm is |w|: under --token-file, not open
        ops.check(caller, "GET /v1/models/{model}/params", model)
        m = ops.model(model)
        version, rows = stats.get(m).param_stats()
        return {"model": m.name, "version": version, "params": rows}

    @app.get(
        "/v1/models/{model}/history",
        tags=["inspect"],
        summary="Per-step history",
        responses=_errors(400, 401, 403, 404),
    )
    def history(
        model: str,
        caller: CallerDep,
        since: int | None = Query(None, description="only steps with a version above this"),
        limit: int | None = Query(None, ge=0, description="at most this many, the newest"),
    ) -> Any:
        ops.check(caller, "GET /v1/models/{model}/history", model)
        m = ops.model(model)
        s = stats.get(m)
        return {
            "model": m.name,
            "version": m.version,
            "stats_every": s.every,
            "steps": [e.as_json() for e in s.entries(since=since, limit=limit)],
        }

    _download_route(app, ops)


def _download_route(app: FastAPI, ops: Operations) -> None:
    @app.get(
        "/v1/models/{model}/snapshot",
        tags=["inspect"],
        summary="Download params and optimizer state as `adamd snapshot export` writes them",
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}}},
            **_errors(401, 403, 404),
        },
    )
    def download(model: str, caller: CallerDep) -> Response:
        ops.check(caller, "GET /v1/models/{model}/snapshot", model)  # the weights themselves
        m = ops.model(model)
        payload = views.snapshot_payload(m)
        buf = io.BytesIO()
        torch.save(payload, buf)
        filename = f"{m.name}-v{payload['adamd']['version']}.pt"
        return Response(
            buf.getvalue(),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )


def _operation_routes(app: FastAPI, ops: Operations) -> None:
    """Changes, each written to the audit log (Operations.guard)."""
    stats = ops.stats
    assert stats is not None

    @app.post(
        "/v1/models/{model}/param_groups/{group}",
        tags=["operate"],
        summary="Change hyperparameters of one param group",
        responses=_errors(400, 401, 403, 404, 409),
    )
    def set_hyperparams(model: str, group: int, body: Hyperparams, caller: CallerDep) -> Any:
        with ops.guard(caller, "POST /v1/models/{model}/param_groups/{group}", model):
            updates = body.model_dump(exclude_none=True)
            if not updates:
                raise InvalidArgument("send at least one of lr, betas, eps, weight_decay")
            if "betas" in updates:
                updates["betas"] = tuple(updates["betas"])
            m = ops.set_hyperparams(model, [(group, updates)])
        logger.info("HTTP: model %s group %d set %s", m.name, group, updates)
        return views.model_summary(m, stats.get(m), detail=True)

    @app.post(
        "/v1/models/{model}/snapshot",
        tags=["operate"],
        summary="Write a snapshot to the data dir now",
        responses=_errors(401, 403, 404, 409),
    )
    def snapshot(model: str, caller: CallerDep) -> Any:
        t0 = time.perf_counter()
        with ops.guard(caller, "POST /v1/models/{model}/snapshot", model):
            info = ops.snapshot(model)
        logger.info("HTTP: snapshot of %s in %.3fs", model, time.perf_counter() - t0)
        return {field.name: value for field, value in info.ListFields()}

    @app.delete(
        "/v1/models/{model}",
        tags=["operate"],
        summary="Delete a model",
        responses=_errors(401, 403, 404),
    )
    def delete(model: str, caller: CallerDep) -> Any:
        with ops.guard(caller, "DELETE /v1/models/{model}", model):
            ops.delete(model)
        logger.info("HTTP: deleted model %s", model)
        return {"deleted": model}


def _honest_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, less what the server never answers: validation errors are 400 with
    ErrorBody (see _error_handlers), never 422 with FastAPI's HTTPValidationError."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
