"""The HTTP side (FastAPI): health, inspection, metrics and the dashboard, over the daemon's core."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from .daemon import Daemon


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(
        title="adamd", description="Optimizer-as-a-service: inspection, metrics and dashboard."
    )

    @app.get("/healthz")
    def healthz() -> Any:
        if not daemon.grpc_ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok"}

    return app
