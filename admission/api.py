"""HTTP side of admission: the JWKS, the operators' admission routes, and the lifespan hooks.

- ``GET /.well-known/jwks.json``: the public keys that verify queue passes;
- ``PATCH /v1/admin/events/{event_id}/admission``: change rate, ``max_active``, paused;
- ``GET /v1/admin/events/{event_id}/admission``: the live view (as ``waitroom status``);
- ``POST /v1/admin/passes/{jti}/revoke``: revoke a queue pass.

:func:`start` (called from the app's lifespan) loads the pass keys into
``Context.services["passes"]`` (the :class:`~admission.passes.PassGate` checkout uses) and,
unless ``WAITROOM_ADMISSION_LOOP`` is off, starts this process's
:class:`~admission.loop.AdmissionService`.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from admission import operators
from admission.loop import AdmissionService
from admission.passes import JWKS, PassGate, PassKeys
from waitroom.context import Context, context, require_admin
from waitroom.http import JSONResponse, read_json
from waitroom.openapi import Operation
from waitroom.room import Rooms


async def start(ctx: Context) -> None:
    """Load the pass keys, and start the admission loops of this process if enabled."""
    pass_keys = PassKeys.from_settings(ctx.settings)
    ctx.services["passes"] = PassGate(pass_keys, ctx.redis, ctx.keys, ctx.settings.pass_issuer)
    if not ctx.settings.admission_loop:
        return
    queue = ctx.services.get("queue")
    rooms = queue.rooms if queue is not None else Rooms(ctx.redis, ctx.db, ctx.keys)
    service = AdmissionService(
        redis=ctx.redis,
        db=ctx.db,
        keys=ctx.keys,
        pass_keys=pass_keys,
        issuer=ctx.settings.pass_issuer,
        rooms=rooms,
    )
    ctx.services["admission"] = service
    await service.start()


async def stop(ctx: Context) -> None:
    """Stop the admission loops, handing their leases over at once."""
    service: AdmissionService | None = ctx.services.pop("admission", None)
    if service is not None:
        await service.stop()


async def jwks(request: Request) -> Response:
    """The public keys that verify queue passes (OKP / Ed25519, by ``kid``)."""
    gate: PassGate = context(request).services["passes"]
    return JSONResponse(gate.pass_keys.jwks(), headers={"Cache-Control": "public, max-age=300"})


async def patch_admission(request: Request) -> Response:
    """Change the admission rate, the cap on active passes, or pause/resume admission."""
    actor = require_admin(request)
    ctx = context(request)
    patch = await read_json(request, operators.AdmissionPatch)
    operators.check_patch(patch)
    result = await operators.update_admission(
        ctx.db, ctx.redis, ctx.keys, request.path_params["event_id"], patch, actor=actor
    )
    return JSONResponse(result)


async def get_admission(request: Request) -> Response:
    """The live admission figures of an event."""
    require_admin(request)
    ctx = context(request)
    status = await operators.admission_status(
        ctx.db, ctx.redis, ctx.keys, request.path_params["event_id"], now=time.time()
    )
    return JSONResponse(status, headers={"Cache-Control": "no-store"})


async def revoke(request: Request) -> Response:
    """Revoke a queue pass: checkout refuses it from now on, and its slot is freed."""
    actor = require_admin(request)
    ctx = context(request)
    result = await operators.revoke_pass(
        ctx.db, ctx.redis, ctx.keys, request.path_params["jti"], actor=actor
    )
    return JSONResponse(result)


OPERATIONS = [
    Operation(
        "GET",
        "/.well-known/jwks.json",
        jwks,
        "Public keys that verify queue passes",
        response=JWKS,
        tags=("service",),
    ),
    Operation(
        "PATCH",
        "/v1/admin/events/{event_id}/admission",
        patch_admission,
        "Change admission rate, max_active, paused",
        request=operators.AdmissionPatch,
        response=operators.AdmissionSettings,
        errors=(404, 503),
        tags=("operators",),
        auth="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/events/{event_id}/admission",
        get_admission,
        "Live admission figures",
        response=operators.AdmissionStatus,
        errors=(404, 503),
        tags=("operators",),
        auth="admin",
    ),
    Operation(
        "POST",
        "/v1/admin/passes/{jti}/revoke",
        revoke,
        "Revoke a queue pass",
        response=operators.RevokedPass,
        errors=(404, 503),
        tags=("operators",),
        auth="admin",
    ),
]
