"""The fleet's TUF repository over HTTP, for enrolled devices (``tuf.ngclient`` layout).

* ``GET /v1/repository/metadata/{name}`` — ``timestamp.json``, ``N.snapshot.json``,
  ``N.targets.json``, ``N.root.json`` (every root version, so devices walk key rotations).
* ``GET /v1/repository/targets/{path}`` — target files by their consistent-snapshot name
  (``model/3/<sha256>.model.int8.onnx``), streamed from disk with HTTP Range (206 with
  ``Content-Range``, 416 when unsatisfiable, ``If-Range``) and ``ETag: "<sha256>"``.

Both need a device signature (``DeviceAuth``); decommissioned devices are refused. Metadata is
not secret to TUF (signatures, not secrecy, protect it), but the targets metadata lists every
model, version and compatible profile of the fleet, and devices sign every request anyway, so
only enrolled devices may read it. A target file is served only to a device the fleet has
assigned its release (an update or a rollback, now or before): another device's release, or one
never assigned to anyone, answers 403, so a device with stolen-but-valid credentials cannot pull
every model of the fleet. Unknown names and anything that is not a plain path inside the
repository answer 404.

This router's lifespan also starts the app's scheduler (:mod:`fleet.scheduler`), which keeps
the served timestamp fresh.
"""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from fleet.auth import DeviceAuth
from fleet.dependencies import Context
from fleet.errors import PermissionDeniedError, RepositoryFileNotFoundError
from fleet.routes.assignments import DesiredState
from fleet.scheduler import lifespan as lifespan
from fleet.tuf_repo import TufRepository

router = APIRouter(prefix="/v1/repository", tags=["repository"])


def _repo(ctx: Context) -> TufRepository:
    return TufRepository(ctx.settings.tuf_dir, {})


@router.get("/metadata/{name}", summary="TUF metadata for devices (device signature)")
def metadata(name: str, _: DeviceAuth, ctx: Context) -> Response:
    path = _repo(ctx).metadata_file(name)
    if path is None:
        raise RepositoryFileNotFoundError(
            f"no TUF metadata {name!r}; devices fetch timestamp.json, N.snapshot.json, "
            "N.targets.json and N.root.json"
        )
    # read whole (small) rather than streamed: timestamp.json is replaced while it is served
    data = path.read_bytes()
    return Response(
        data,
        media_type="application/json",
        headers={"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Cache-Control": "no-cache"},
    )


@router.get(
    "/targets/{path:path}",
    summary="A target file of a release assigned to the device, with Range (device signature)",
)
def target(path: str, device: DeviceAuth, ctx: Context, desired: DesiredState) -> FileResponse:
    found = _repo(ctx).target_file(path)
    parts = path.split("/")
    if found is None or len(parts) < 3 or not parts[1].isdecimal():
        raise RepositoryFileNotFoundError(
            f"no target file {path!r}; target URLs are <model>/<version>/<sha256>.<file> as "
            "listed in the signed targets metadata"
        )
    model, version = parts[0], int(parts[1])
    if not desired.was_assigned(device.id, model, version):
        raise PermissionDeniedError(
            f"release {model} v{version} was never assigned to device {device.id}; a device "
            f"downloads only the releases its desired documents name (assign it with "
            f"`fleet assign {device.id} --model {model} --version {version}`)"
        )
    digest = found.name.split(".", 1)[0]  # content-addressed: the name starts with its sha256
    return FileResponse(
        found,
        media_type="application/octet-stream",
        headers={"ETag": f'"{digest}"', "Cache-Control": "private, max-age=31536000, immutable"},
    )
