"""Receive an uploaded model bundle (a ``.tar.gz`` of a bundle directory) and validate it.

Three steps, each refusing with a message that names the file and what is wrong:

1. :func:`receive` streams the request body to a file with a hard cap on its (compressed) size
   (:class:`~fleet.errors.BundleTooLargeError`, HTTP 413).
2. :func:`unpack` extracts it into a fresh directory, reading the decompressed stream through a
   counter so no archive (a gzip or tar bomb, a giant pax header) can make it read more than
   the unpacked cap; it refuses absolute paths, ``..``, links, devices, FIFOs, duplicate names,
   too many members, and files over the per-file cap (:class:`~fleet.errors.BundleArchiveError`
   400, :class:`~fleet.errors.BundleTooLargeError` 413). Members are written with plain
   ``open(..., "xb")`` under the directory, never with ``tarfile.extract``.
3. :func:`validate` runs :func:`models.check.check_bundle` with the agent's runtime layer
   (every file's hash and length, no stray files, reference profile against the bundle's
   features and classes, each artifact loaded in its runtime with its input/output signature
   held to ``bundle.json``'s one signature, so all artifacts agree, and its golden set replayed
   within the health tolerance) (:class:`~fleet.errors.BundleRejectedError`, 422).

The archive may hold the bundle's files at its top level or inside one top-level directory.
This module decides nothing about versions or publishing (:mod:`fleet.registry` does) and
stores nothing outside the directories it is given.
"""

from __future__ import annotations

import gzip
import io
import logging
import shutil
import tarfile
import zlib
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleet.errors import BundleArchiveError, BundleRejectedError, BundleTooLargeError
from models.check import BundleCheck, check_bundle
from protocol.bundle import METADATA_FILE, BundleMetadata

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_MEMBERS = 256


@dataclass(frozen=True)
class UploadLimits:
    """Caps on one upload: compressed bytes, unpacked bytes in all, per file, and members."""

    max_compressed: int
    max_unpacked: int
    max_file: int
    max_members: int = MAX_MEMBERS

    @classmethod
    def from_max_upload(cls, max_upload_bytes: int) -> UploadLimits:
        # Model weights barely compress, so the unpacked caps equal the compressed one: a real
        # bundle never comes near them, a bomb hits them after reading that many bytes at most.
        return cls(max_upload_bytes, max_upload_bytes, max_upload_bytes)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


async def receive(chunks: AsyncIterable[bytes], dest: Path, limits: UploadLimits) -> int:
    """Write the body ``chunks`` to ``dest``; refuse (and delete it) past the compressed cap."""
    size = 0
    try:
        with open(dest, "xb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > limits.max_compressed:
                    raise BundleTooLargeError(
                        f"the upload is over the limit of {_mib(limits.max_compressed)} "
                        "(limits.max_upload_bytes); make the bundle smaller or raise the limit"
                    )
                f.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    if size == 0:
        dest.unlink(missing_ok=True)
        raise BundleArchiveError(
            "the upload is empty: send the bundle as a .tar.gz body "
            "(Content-Type: application/gzip), e.g. with `fleet release upload BUNDLE_DIR`"
        )
    return size


class _CappedReader(io.RawIOBase):
    """A read-only stream over ``inner`` that raises once more than ``cap`` bytes are read."""

    def __init__(self, inner: Any, cap: int) -> None:
        self._inner = inner
        self._cap = cap
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        data = self._inner.read(len(view))
        self.count += len(data)
        if self.count > self._cap:
            raise BundleTooLargeError(
                f"the bundle unpacks to more than {_mib(self._cap)}; refusing it (a compressed "
                "bomb or an oversized bundle)"
            )
        view[: len(data)] = data
        return len(data)


def _member_path(name: str) -> str:
    rel = name[2:] if name.startswith("./") else name
    rel = rel.rstrip("/")
    parts = rel.split("/")
    if (
        not rel
        or name.startswith("/")
        or "\\" in rel
        or any(p in ("", ".", "..") for p in parts)
        or any(ord(c) < 0x20 for c in rel)
    ):
        raise BundleArchiveError(
            f"archive member {name!r} is not a plain relative path inside the bundle; pack the "
            "bundle directory's contents with `fleet release upload`"
        )
    return rel


def unpack(archive: Path, dest: Path, limits: UploadLimits) -> Path:
    """Extract the ``.tar.gz`` ``archive`` into the new directory ``dest``; return the bundle
    directory in it (``dest`` or its one top-level directory holding ``bundle.json``)."""
    dest.mkdir(parents=False, exist_ok=False)
    seen: set[str] = set()
    dirs: set[str] = set()
    total = 0
    # tar headers, padding and the end blocks come on top of the file data
    overhead = 1024 * (limits.max_members + 2) * 2
    try:
        with gzip.open(archive, "rb") as gz:
            capped = io.BufferedReader(_CappedReader(gz, limits.max_unpacked + overhead))
            with tarfile.open(fileobj=capped, mode="r|") as tar:
                for count, member in enumerate(tar, start=1):
                    if count > limits.max_members:
                        raise BundleArchiveError(
                            f"the archive has more than {limits.max_members} members; a bundle "
                            "has a handful of files"
                        )
                    rel = _member_path(member.name)
                    if rel in seen:
                        raise BundleArchiveError(f"archive member {rel!r} appears twice")
                    seen.add(rel)
                    if member.isdir():
                        dirs.add(rel)
                        (dest / rel).mkdir(parents=True, exist_ok=True)
                        continue
                    if not member.isreg():
                        kind = "link" if member.issym() or member.islnk() else "special file"
                        raise BundleArchiveError(
                            f"archive member {rel!r} is a {kind}; a bundle holds regular files only"
                        )
                    if member.size > limits.max_file:
                        raise BundleTooLargeError(
                            f"{rel} is {_mib(member.size)}, over the per-file limit of "
                            f"{_mib(limits.max_file)}"
                        )
                    total += member.size
                    if total > limits.max_unpacked:
                        raise BundleTooLargeError(
                            f"the bundle unpacks to more than {_mib(limits.max_unpacked)} "
                            f"(at {rel}); make it smaller or raise limits.max_upload_bytes"
                        )
                    _extract(tar, member, dest, rel)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, FileExistsError):
            raise BundleArchiveError(f"archive member {exc.filename!r} clashes") from exc
        raise BundleArchiveError(
            f"the upload is not a readable .tar.gz ({type(exc).__name__}: {exc}); pack the "
            "bundle directory with `tar -czf bundle.tar.gz -C BUNDLE_DIR .` or use "
            "`fleet release upload`"
        ) from exc
    if (dest / METADATA_FILE).is_file():
        return dest
    tops = {p.split("/")[0] for p in seen}
    if len(tops) == 1:
        (top,) = tops
        if (dest / top / METADATA_FILE).is_file():
            return dest / top
    raise BundleArchiveError(
        f"the archive has no {METADATA_FILE} at its top level (or in its one top-level "
        "directory); pack a bundle directory as built by `fleet models build`"
    )


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, rel: str) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise BundleArchiveError(f"archive member {rel!r} has no data")
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    # "x": never follow or replace anything already there
    with source, open(target, "xb") as out:
        written = 0
        while chunk := source.read(CHUNK):
            written += len(chunk)
            out.write(chunk)
    if written != member.size:
        raise BundleArchiveError(f"archive member {rel!r} is truncated")


def pack(directory: Path) -> bytes:
    """The ``.tar.gz`` of the bundle ``directory`` (its files at the archive's top level, in
    name order, without owners or times, so the same bundle packs to the same bytes)."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            if path.is_symlink():
                continue  # never pack what a link points to
            info = tar.gettarinfo(str(path), arcname=path.relative_to(directory).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return buffer.getvalue()


def agent_runner(runtime: str, path: Path, inputs: np.ndarray, meta: BundleMetadata) -> np.ndarray:
    """Replay through the agent's runtime layer, as a device would: the model's own input and
    output signature is held to the bundle's (so every artifact has the same signature)."""
    from agent.runtimes import load_runtime

    rt = load_runtime(path, runtime, 1, expect_input=meta.input, expect_output=meta.output)
    try:
        return rt.predict(inputs)
    finally:
        rt.close()


def problems_of(report: BundleCheck) -> tuple[str, ...]:
    """Every finding of a bundle check, each naming the file it is about."""
    found = list(report.problems)
    for a in report.artifacts:
        if not a.passed:
            found.append(f"{a.file} ({a.runtime}, {a.quantization}): {a.reason}")
    return tuple(found)


def validate(directory: Path) -> BundleMetadata:
    """Check the unpacked bundle (see the module docstring); return its metadata or raise
    :class:`BundleRejectedError` listing every problem."""
    report = check_bundle(directory, runner=agent_runner)
    problems = problems_of(report)
    if report.metadata is None or problems:
        raise BundleRejectedError(
            "the bundle was refused: "
            + "; ".join(problems)
            + " — fix the bundle (`fleet models check BUNDLE_DIR` shows the same) and upload "
            "it again",
            problems,
        )
    return report.metadata


def remove_tree(path: Path) -> None:
    """Delete an upload's working directory (never follows links)."""
    shutil.rmtree(path, ignore_errors=True)
