"""The HTTP side (FastAPI): health, inspection JSON, snapshot download, Prometheus metrics, the
dashboard, and a few operations, all over the daemon's own core (no second copy of state).

Read-only routes are open. Routes that change state (hyperparameters, snapshots, deletes) need
`Authorization: Bearer <token>` when the daemon has a token. Every error, ours or the framework's
(unknown route, bad body), answers with the same JSON body: {"error": kind, "message": ...}.
"""

from __future__ import annotations

import hmac
import io
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import views
from .errors import FailedPrecondition, InvalidArgument, ServerError, Unauthenticated

if TYPE_CHECKING:
    from .daemon import Daemon

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
_STATUS_KIND = {400: "InvalidArgument", 401: "Unauthenticated", 404: "NotFound", 405: "NotAllowed"}


class Hyperparams(BaseModel):
    """New values for one param group; fields left out keep their value."""

    model_config = ConfigDict(extra="forbid")
    lr: float | None = Field(None, description="learning rate", examples=[0.001])
    betas: tuple[float, float] | None = Field(None, description="(beta1, beta2)")
    eps: float | None = None
    weight_decay: float | None = None


def error_body(kind: str, message: str, status: int) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        {"error": kind, "message": message, "status": status}, status_code=status, headers=headers
    )


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(
        title="adamd",
        description="Optimizer-as-a-service: inspection, metrics, dashboard and operations. "
        "Statistics are open; the snapshot download, POST and DELETE need "
        "`Authorization: Bearer <token>` when the server has a token.",
        version=views.adamd_version(),
    )
    registry, stats = daemon.registry, daemon.stats

    # --- errors: one place maps them all to JSON -------------------------------------------------

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

    def require_token(request: Request) -> None:
        token = daemon.config.token
        if token is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise Unauthenticated("this operation needs the header 'Authorization: Bearer <token>'")

    def model_of(name: str) -> Any:
        return registry.get(name)  # NotFound -> 404 through the handler above

    # --- health and metrics ---------------------------------------------------------------------

    @app.get("/healthz", tags=["health"], summary="Liveness")
    def healthz() -> Any:
        if not daemon.grpc_ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: gRPC serving, models restored")
    def readyz() -> Any:
        ready = daemon.grpc_ready
        body = {"status": "ready" if ready else "not ready", "models": len(registry.names())}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text format)")
    def metrics() -> Response:
        return Response(daemon.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # --- inspection -----------------------------------------------------------------------------

    @app.get("/v1/models", tags=["inspect"], summary="The server and every model, briefly")
    def list_models() -> Any:
        return {
            "server": views.server_info(daemon),
            "models": [views.model_summary(m, stats.get(m)) for m in registry.models()],
        }

    @app.get("/v1/models/{model}", tags=["inspect"], summary="One model with its param groups")
    def describe(model: str) -> Any:
        m = model_of(model)
        return views.model_summary(m, stats.get(m), detail=True)

    @app.get("/v1/models/{model}/params", tags=["inspect"], summary="Per-parameter statistics")
    def params(model: str) -> Any:
        m = model_of(model)
        version, rows = stats.get(m).param_stats()
        return {"model": m.name, "version": version, "params": rows}

    @app.get("/v1/models/{model}/history", tags=["inspect"], summary="Per-step history")
    def history(
        model: str,
        since: int | None = Query(None, description="only steps with a version above this"),
        limit: int | None = Query(None, ge=0, description="at most this many, the newest"),
    ) -> Any:
        m = model_of(model)
        s = stats.get(m)
        entries = s.entries(since=since, limit=limit)
        return {
            "model": m.name,
            "version": m.version,
            "stats_every": s.every,
            "steps": [e.as_json() for e in entries],
        }

    @app.get(
        "/v1/models/{model}/snapshot",
        tags=["inspect"],
        summary="Download params and optimizer state as `adamd snapshot export` writes them",
        dependencies=[Depends(require_token)],  # the weights themselves, as a gRPC pull
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def download(model: str) -> Response:
        m = model_of(model)
        payload = views.snapshot_payload(m)
        buf = io.BytesIO()
        torch.save(payload, buf)
        filename = f"{m.name}-v{payload['adamd']['version']}.pt"
        return Response(
            buf.getvalue(),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    # --- operations (token) ---------------------------------------------------------------------

    @app.post(
        "/v1/models/{model}/param_groups/{group}",
        tags=["operate"],
        summary="Change hyperparameters of one param group",
        dependencies=[Depends(require_token)],
    )
    def set_hyperparams(model: str, group: int, body: Hyperparams) -> Any:
        m = model_of(model)
        updates = body.model_dump(exclude_none=True)
        if not updates:
            raise InvalidArgument("send at least one of lr, betas, eps, weight_decay")
        if "betas" in updates:
            updates["betas"] = tuple(updates["betas"])
        m.set_hyperparams([(group, updates)])
        daemon.hooks.changed(m.name)  # durable mode: on disk before the reply
        logger.info("HTTP: model %s group %d set %s", m.name, group, updates)
        return views.model_summary(m, stats.get(m), detail=True)

    @app.post(
        "/v1/models/{model}/snapshot",
        tags=["operate"],
        summary="Write a snapshot to the data dir now",
        dependencies=[Depends(require_token)],
    )
    def snapshot(model: str) -> Any:
        m = model_of(model)
        hook = daemon.hooks.snapshot
        if hook is None:
            raise FailedPrecondition("snapshots are not enabled on this server")
        t0 = time.perf_counter()
        info = hook(m.name)
        logger.info("HTTP: snapshot of %s in %.3fs", m.name, time.perf_counter() - t0)
        return {field.name: value for field, value in info.ListFields()}

    @app.delete(
        "/v1/models/{model}",
        tags=["operate"],
        summary="Delete a model",
        dependencies=[Depends(require_token)],
    )
    def delete(model: str) -> Any:
        registry.delete(model)
        logger.info("HTTP: deleted model %s", model)
        return {"deleted": model}

    # --- dashboard ------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
