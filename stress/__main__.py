"""``python -m stress NAME [--json] [options]``: run one benchmark against real Redis and PostgreSQL.

Each benchmark module under ``stress/`` exposes ``add_arguments(parser)`` and
``async def run(args) -> dict``; the result is printed as one JSON object on the last line.
A benchmark that finds an invariant broken sets ``"ok": false`` and the process exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import msgspec
import uvloop

from waitroom.core.runtime import tune_gc

BENCHMARKS = {
    "join": "stress.join",
    "websocket": "stress.websocket",
    "admission": "stress.admission",
    "reserve": "stress.reserve",
    "flash-sale": "stress.flash_sale",
    "bots": "stress.bots",
    "chaos": "stress.chaos",
    "checkout": "stress.checkout",
    "affinity": "stress.affinity",
    "cluster_clients": "stress.cluster_clients",
    "cluster": "stress.cluster",
    "tracing": "stress.tracing",
    "waitlist": "stress.waitlist",
    "seats": "stress.seats",
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``NAME`` and its options, run the benchmark, print its JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(
            f"usage: python -m stress {{{','.join(BENCHMARKS)}}} [--json] [options]",
            file=sys.stderr,
        )
        return 2
    name = argv[0]
    try:
        module: Any = importlib.import_module(BENCHMARKS[name])
    except ModuleNotFoundError:
        print(f"stress: benchmark {name!r} is not built yet", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"python -m stress {name}")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    tune_gc()
    # The server runs on uvloop (uvicorn's default when it is installed); so do benchmarks.
    result: dict[str, Any] = uvloop.run(module.run(args))
    result.setdefault("benchmark", name)
    print(msgspec.json.encode(result).decode(), flush=True)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
