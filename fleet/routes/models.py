"""The model registry over HTTP: upload a bundle (operator) and read releases (viewer).

``POST /v1/models`` takes the bundle as a raw ``.tar.gz`` request body (``Content-Type:
application/gzip``; not multipart, so nothing is parsed before the caller's role is checked and
the body streams to disk under the size cap). Uploading validates and publishes in one step:
the answer is 201 with the release, or 400/409/413/422 saying what is wrong with which file.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, status
from starlette.concurrency import run_in_threadpool

from fleet.auth import Operator, Viewer
from fleet.bundle_upload import UploadLimits, receive, remove_tree
from fleet.dependencies import DB, Context, Now, VersionPath
from fleet.errors import BundleArchiveError, BundleTooLargeError
from fleet.registry import ModelRegistry, ModelSummary, PublishedRelease, Release, ReleaseService

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["models"])
UPLOADS = "uploads"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Remove upload working directories a crash left behind (nothing in them was published)."""
    uploads = app.state.fleet.settings.data_dir / UPLOADS
    if uploads.is_dir():
        for stale in uploads.iterdir():
            log.info("removing the unfinished upload %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
    yield


@router.post(
    "/models",
    status_code=status.HTTP_201_CREATED,
    summary="Upload a model bundle (.tar.gz body): validate, then publish it as a release "
    "(operator)",
)
async def upload_bundle(
    request: Request, ctx: Context, db: DB, operator: Operator, now: Now
) -> PublishedRelease:
    limits = UploadLimits.from_max_upload(ctx.settings.limits.max_upload_bytes)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/"):
        raise BundleArchiveError(
            "send the bundle as the raw request body (Content-Type: application/gzip), not as "
            "a multipart form; `fleet release upload BUNDLE_DIR` does this"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_compressed:
        raise BundleTooLargeError(
            f"the upload is {declared} bytes, over the limit of {limits.max_compressed} "
            "(limits.max_upload_bytes); make the bundle smaller or raise the limit"
        )
    work = ctx.settings.data_dir / UPLOADS / secrets.token_hex(8)
    work.mkdir(parents=True)
    try:
        archive = work / "bundle.tar.gz"
        await receive(request.stream(), archive, limits)
        service = ReleaseService(db, ctx.settings)
        return await run_in_threadpool(
            service.upload, archive, work / "unpacked", operator.actor, now
        )
    finally:
        await run_in_threadpool(remove_tree, work)


@router.get("/models", summary="Models and their latest version (viewer)")
def list_models(db: DB, _: Viewer) -> list[ModelSummary]:
    return ModelRegistry(db).models()


@router.get("/models/{name}/releases", summary="A model's releases, newest first (viewer)")
def list_releases(name: str, db: DB, _: Viewer) -> list[Release]:
    return ModelRegistry(db).releases(name)


@router.get("/models/{name}/releases/{version}", summary="One release (viewer)")
def get_release(name: str, version: VersionPath, db: DB, _: Viewer) -> Release:
    return ModelRegistry(db).get(name, version)
