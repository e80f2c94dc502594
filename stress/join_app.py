"""The server of the join benchmark: the real app plus one trivial endpoint to compare against.

``python -m stress.join_app [--port N]`` serves what ``waitroom serve`` serves, with the same
uvicorn options (:func:`waitroom.cli.run_server`), plus ``GET /stress/trivial``. The extra
route exists only in this benchmark process: the production app never has it. It goes
through the same middleware (request id, metrics, error handling) as every real route, and
is the first route tried, so the join/trivial ratio measures the join's own work.
"""

from __future__ import annotations

import argparse
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from waitroom.app import create_app
from waitroom.cli import run_server
from waitroom.core.http import JSONResponse
from waitroom.core.logs import configure_logging
from waitroom.core.openapi import Operation
from waitroom.core.runtime import tune_gc
from waitroom.core.settings import load_settings
from waitroom.core.tracing import configure_tracing

TRIVIAL_PATH = "/stress/trivial"
_OK = {"ok": True}


async def trivial(request: Request) -> Response:
    """The cheapest answer the stack can give: a constant JSON object."""
    return JSONResponse(_OK)


TRIVIAL = Operation("GET", TRIVIAL_PATH, trivial, "Benchmark baseline", tags=("stress",))


def app_from_env() -> Starlette:
    """App factory, as :func:`waitroom.app.app_from_env`, with the trivial route added."""
    settings = load_settings()
    configure_logging(settings.log_level)
    configure_tracing("waitroom-api")  # as the real app factory: on with the OTLP endpoint
    tune_gc()
    app = create_app(settings, extra_operations=[TRIVIAL])
    # Extra routes come last, and starlette tries routes in order: the trivial route would
    # pay a dozen failed matches that the join route (9th) does not. First, it pays none,
    # which keeps the comparison on the join's side of harsh.
    routes = app.router.routes
    trivial_route = next(r for r in routes if getattr(r, "path", None) == TRIVIAL_PATH)
    routes.remove(trivial_route)
    routes.insert(0, trivial_route)
    return app


def main(argv: list[str] | None = None) -> int:
    """Serve the benchmark app on ``--port`` (default WAITROOM_PORT), one worker."""
    parser = argparse.ArgumentParser(prog="python -m stress.join_app")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(settings.log_level)
    run_server(
        "stress.join_app:app_from_env",
        host=settings.host,
        port=settings.port if args.port is None else args.port,
        workers=args.workers,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
