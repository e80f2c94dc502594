"""HTTP side of admission: the JWKS and the operators' admission routes.

- ``GET /.well-known/jwks.json``: the public keys that verify queue passes;
- ``PATCH /v1/admin/events/{event_id}/admission``: change rate, ``max_active``, paused;
- ``GET /v1/admin/events/{event_id}/admission``: the live view (as ``waitroom status``);
- ``POST /v1/admin/passes/{jti}/revoke``: revoke a queue pass.

The pass keys and this process's admission loops are built in :mod:`waitroom.services`.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from admission import operators
from admission.passes import JWKS
from waitroom.core.http import JSONResponse, read_json
from waitroom.core.openapi import Operation
from waitroom.services import require_admin, services


async def jwks(request: Request) -> Response:
    """The public keys that verify queue passes (OKP / Ed25519, by ``kid``)."""
    return JSONResponse(
        services(request).passes.pass_keys.jwks(), headers={"Cache-Control": "public, max-age=300"}
    )


async def patch_admission(request: Request) -> Response:
    """Change the admission rate, the cap on active passes, or pause/resume admission."""
    actor = await require_admin(request)
    svc = services(request)
    patch = await read_json(request, operators.AdmissionPatch)
    operators.check_patch(patch)
    result = await operators.update_admission(
        svc.db, svc.redis, svc.keys, request.path_params["event_id"], patch, actor=actor
    )
    return JSONResponse(result)


async def get_admission(request: Request) -> Response:
    """The live admission figures of an event."""
    await require_admin(request)
    svc = services(request)
    status = await operators.admission_status(
        svc.db, svc.redis, svc.keys, request.path_params["event_id"], now=time.time()
    )
    return JSONResponse(status, headers={"Cache-Control": "no-store"})


async def revoke(request: Request) -> Response:
    """Revoke a queue pass: checkout refuses it from now on, and its slot is freed."""
    actor = await require_admin(request)
    svc = services(request)
    result = await operators.revoke_pass(
        svc.db, svc.redis, svc.keys, request.path_params["jti"], actor=actor
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
