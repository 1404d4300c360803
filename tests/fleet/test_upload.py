"""Bundle upload over real HTTP: the committed bundles publish, and every bad upload is refused
with the reason (naming the file) while nothing is stored: not a release row, not an artifact,
not a TUF target, not a leftover upload directory. Archive safety (traversal, links, devices,
duplicates, bombs) is also checked on :func:`fleet.bundle_upload.unpack` directly."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from fleet.app import create_app
from fleet.bundle_upload import UploadLimits, pack, unpack
from fleet.errors import BundleArchiveError, BundleTooLargeError
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir
from fleet.settings import FleetSettings
from fleet.tuf_repo import TufRepository
from protocol.bundle import parse_bundle, sha256_hex

BUNDLES = Path(__file__).resolve().parents[2] / "models" / "bundles" / "pdm-classifier"
GZIP = {"Content-Type": "application/gzip"}


@pytest.fixture
def repo(settings: FleetSettings, clock: Callable[[], object]) -> TufRepository:
    """Keys on disk where the app reads them, and an initialised repository."""
    signers = init_key_dir(settings.keys_dir)
    repo = TufRepository(settings.tuf_dir, {r: signers[r] for r in ONLINE_ROLES})
    repo.init(signers[ROOT], clock())  # type: ignore[arg-type]
    return repo


def copy_bundle(tmp_path: Path, version: int = 1) -> Path:
    dest = tmp_path / f"bundle-{version}"
    shutil.copytree(BUNDLES / str(version), dest)
    return dest


def rehash(bundle: Path) -> None:
    """Rewrite bundle.json's hashes to the files as they are now (a consistent, lying bundle)."""
    doc = json.loads((bundle / "bundle.json").read_text())
    for rel in doc["files"]:
        data = (bundle / rel).read_bytes()
        doc["files"][rel] = {"sha256": sha256_hex(data), "length": len(data)}
    (bundle / "bundle.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def upload(http: httpx.Client, headers: dict[str, str], body: bytes) -> httpx.Response:
    return http.post("/v1/models", content=body, headers={**headers, **GZIP})


def stored_nothing(settings: FleetSettings, repo: TufRepository, targets_before: int) -> None:
    uploads = settings.data_dir / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir()), list(uploads.iterdir())
    artifacts = settings.artifacts_dir
    assert not artifacts.exists() or not any(p.is_file() for p in artifacts.rglob("*"))
    assert repo.targets().version == targets_before and not repo.targets().targets


# --- the happy path and the version rule ------------------------------------------------------


def test_upload_publishes_and_versions_only_grow(
    http: httpx.Client,
    operator: dict[str, str],
    viewer: dict[str, str],
    repo: TufRepository,
    settings: FleetSettings,
    tmp_path: Path,
) -> None:
    r = upload(http, operator, pack(BUNDLES / "1"))
    assert r.status_code == 201, r.text
    got = r.json()
    release = got["release"]
    assert (release["model"], release["version"], release["status"]) == (
        "pdm-classifier",
        1,
        "published",
    )
    assert set(got["timings"]) == {"unpack", "validate", "sign"}
    meta = parse_bundle((BUNDLES / "1" / "bundle.json").read_bytes())
    paths = {f["target_path"] for f in release["files"]}
    assert {f"pdm-classifier/1/{a.file}" for a in meta.artifacts} <= paths
    assert "pdm-classifier/1/reference_profile.json" in paths
    # signed into the TUF repository, with the release's custom metadata
    onnx = repo.get_target("pdm-classifier/1/model.int8.onnx")
    assert onnx is not None and onnx.hashes["sha256"] == meta.files["model.int8.onnx"][0]
    custom = onnx.unrecognized_fields["custom"]
    assert (custom["model"], custom["version"], custom["runtime"]) == (
        "pdm-classifier",
        1,
        "onnxruntime",
    )
    # every bundle file kept content-addressed
    for sha, _ in meta.files.values():
        assert (settings.artifacts_dir / "sha256" / sha[:2] / sha).is_file()

    # the same version again, or a lower one: refused, naming the latest
    r = upload(http, operator, pack(BUNDLES / "1"))
    assert r.status_code == 409, r.text
    assert "latest release pdm-classifier v1" in r.json()["detail"]
    assert upload(http, operator, pack(BUNDLES / "2")).status_code == 201
    r = upload(http, operator, pack(BUNDLES / "1"))
    assert r.status_code == 409 and "v2" in r.json()["detail"]

    # viewers read the registry
    models = http.get("/v1/models", headers=viewer).json()
    assert models == [
        {
            "name": "pdm-classifier",
            "latest_version": 2,
            "releases": 2,
            "created_at": models[0]["created_at"],
        }
    ]
    listed = http.get("/v1/models/pdm-classifier/releases", headers=viewer).json()
    assert [x["version"] for x in listed] == [2, 1]
    one = http.get("/v1/models/pdm-classifier/releases/2", headers=viewer).json()
    assert one["metadata"]["version"] == 2 and one["created_by"].startswith("token:")
    assert http.get("/v1/models/pdm-classifier/releases/9", headers=viewer).status_code == 404
    assert http.get("/v1/models/nope/releases", headers=viewer).status_code == 404
    # a viewer cannot upload
    assert upload(http, viewer, pack(BUNDLES / "2")).status_code == 403
    # audited
    audit = http.get("/v1/audit", params={"action": "release.publish"}, headers=operator)
    if audit.status_code == 403:  # audit may need admin
        return
    assert [e["target"] for e in audit.json()["items"]] == [
        "pdm-classifier/2",
        "pdm-classifier/1",
    ]


# --- refusals, nothing stored -----------------------------------------------------------------


def test_one_flipped_byte_is_refused_naming_the_file(
    http: httpx.Client,
    operator: dict[str, str],
    repo: TufRepository,
    settings: FleetSettings,
    tmp_path: Path,
) -> None:
    bundle = copy_bundle(tmp_path)
    data = bytearray((bundle / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.int8.onnx").write_bytes(bytes(data))
    before = repo.targets().version
    r = upload(http, operator, pack(bundle))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "model.int8.onnx: sha256 does not match bundle.json" in detail
    stored_nothing(settings, repo, before)
    assert http.get("/v1/models", headers=operator).json() == []


def test_a_bundle_whose_model_fails_its_golden_set_is_refused(
    http: httpx.Client,
    operator: dict[str, str],
    repo: TufRepository,
    settings: FleetSettings,
    tmp_path: Path,
) -> None:
    bundle = copy_bundle(tmp_path)
    # the v2 network under v1's golden set, with bundle.json re-hashed to match: only the
    # replay in the runtime can tell
    shutil.copyfile(BUNDLES / "2" / "model.fp32.onnx", bundle / "model.fp32.onnx")
    rehash(bundle)
    before = repo.targets().version
    r = upload(http, operator, pack(bundle))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "model.fp32.onnx (onnxruntime, fp32)" in detail
    assert "model.int8.onnx" not in detail  # the good artifacts are not blamed
    stored_nothing(settings, repo, before)


def test_a_stray_file_and_a_broken_bundle_json_are_refused(
    http: httpx.Client, operator: dict[str, str], repo: TufRepository, tmp_path: Path
) -> None:
    bundle = copy_bundle(tmp_path)
    (bundle / "notes.txt").write_text("hello")
    r = upload(http, operator, pack(bundle))
    assert r.status_code == 422 and "notes.txt: not listed in bundle.json" in r.json()["detail"]
    (bundle / "notes.txt").unlink()
    (bundle / "bundle.json").write_text("{not json")
    r = upload(http, operator, pack(bundle))
    assert r.status_code == 422 and "bundle.json" in r.json()["detail"]


def _tar_gz(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _bundle_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    root = BUNDLES / "1"
    return [
        _file(p.relative_to(root).as_posix(), p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, produced lazily (the bomb is built without holding it)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def bomb(size: int) -> bytes:
    """A valid bundle plus one member of ``size`` zero bytes: tiny compressed."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for info, data in _bundle_members():
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("padding.bin")
        info.size = size
        tar.addfile(info, io.BufferedReader(_Zeros(size)))  # type: ignore[type-var]
    return buffer.getvalue()


BAD_ARCHIVES: dict[str, tuple[bytes, int, str]] = {
    "traversal": (_tar_gz(*_bundle_members(), _file("../escape.txt", b"x")), 400, "escape.txt"),
    "nested traversal": (
        _tar_gz(*_bundle_members(), _file("golden/../../escape.txt", b"x")),
        400,
        "not a plain relative path",
    ),
    "absolute": (_tar_gz(_file("/etc/cron.d/x", b"x")), 400, "/etc/cron.d/x"),
    "symlink": (
        _tar_gz(*_bundle_members(), _special("evil", tarfile.SYMTYPE, "/etc/passwd")),
        400,
        "'evil' is a link",
    ),
    "hardlink": (
        _tar_gz(*_bundle_members(), _special("hard", tarfile.LNKTYPE, "bundle.json")),
        400,
        "'hard' is a link",
    ),
    "device": (_tar_gz(_special("dev", tarfile.CHRTYPE)), 400, "special file"),
    "fifo": (_tar_gz(_special("fifo", tarfile.FIFOTYPE)), 400, "special file"),
    "duplicate": (
        _tar_gz(_file("bundle.json", b"{}"), _file("./bundle.json", b"{}")),
        400,
        "appears twice",
    ),
    "not gzip": (b"PK\x03\x04 this is a zip", 400, "not a readable .tar.gz"),
    "truncated": (pack(BUNDLES / "1")[:5000], 400, "not a readable .tar.gz"),
    "no bundle.json": (_tar_gz(_file("model.onnx", b"x")), 400, "no bundle.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_unsafe_or_broken_archives_are_refused_over_http(
    case: str,
    http: httpx.Client,
    operator: dict[str, str],
    repo: TufRepository,
    settings: FleetSettings,
    tmp_path: Path,
) -> None:
    body, status, needle = BAD_ARCHIVES[case]
    before = repo.targets().version
    r = upload(http, operator, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"], r.json()["detail"]
    stored_nothing(settings, repo, before)
    assert not (tmp_path / "escape.txt").exists()
    assert not (settings.data_dir / "escape.txt").exists()


@pytest.fixture
def small(settings: FleetSettings) -> FleetSettings:
    """Limits that the sample bundle (about 24 KB packed, 60 KB unpacked) fits in."""
    return settings.model_copy(
        update={"limits": settings.limits.model_copy(update={"max_upload_bytes": 200_000})}
    )


def test_oversized_and_bomb_uploads_are_413(
    small: FleetSettings,
    repo: TufRepository,
    launch: Callable[[FastAPI], str],
    mint: Callable[[str], dict[str, str]],
) -> None:
    url = launch(create_app(small))
    operator = mint("operator")
    with httpx.Client(base_url=url, timeout=30) as http:
        # compressed size over the cap: announced (Content-Length) ...
        r = upload(http, operator, b"\x1f\x8b" + bytes(300_000))
        assert r.status_code == 413 and "limits.max_upload_bytes" in r.json()["detail"]

        # ... and streamed without a length (chunked)
        def chunks() -> object:
            for _ in range(40):
                yield bytes(10_000)

        r = http.post("/v1/models", content=chunks(), headers={**operator, **GZIP})  # type: ignore[arg-type]
        assert r.status_code == 413, r.text
        # a bomb: 2 KB compressed, 50 MB of zeros inside
        body = bomb(50_000_000)
        assert len(body) < 100_000
        r = upload(http, operator, body)
        assert r.status_code == 413, r.text
        assert "padding.bin" in r.json()["detail"]
        stored_nothing(small, repo, repo.targets().version)
        # the real bundle still fits
        assert upload(http, operator, pack(BUNDLES / "1")).status_code == 201


def test_multipart_is_refused_with_the_way_to_upload(
    http: httpx.Client, operator: dict[str, str], repo: TufRepository
) -> None:
    r = http.post(
        "/v1/models", files={"bundle": ("b.tar.gz", pack(BUNDLES / "1"))}, headers=operator
    )
    assert r.status_code == 400 and "application/gzip" in r.json()["detail"]
    assert http.post("/v1/models", content=b"", headers={**operator, **GZIP}).status_code == 400


# --- unpack() directly ------------------------------------------------------------------------

LIMITS = UploadLimits(max_compressed=10**6, max_unpacked=10**6, max_file=10**6, max_members=32)


def test_unpack_accepts_one_top_level_directory(tmp_path: Path) -> None:
    members = [(_file(f"pdm-1/{i.name}", d)) for i, d in _bundle_members()]
    archive = tmp_path / "b.tar.gz"
    archive.write_bytes(_tar_gz(*members))
    found = unpack(archive, tmp_path / "out", LIMITS)
    assert found == tmp_path / "out" / "pdm-1" and (found / "bundle.json").is_file()


@pytest.mark.parametrize(
    ("limits", "error", "needle"),
    [
        (UploadLimits(10**6, 10**6, 1000, 32), BundleTooLargeError, "per-file limit"),
        (UploadLimits(10**6, 20_000, 10**6, 32), BundleTooLargeError, "unpacks to more"),
        (UploadLimits(10**6, 10**6, 10**6, 3), BundleArchiveError, "more than 3 members"),
    ],
)
def test_unpack_limits(
    tmp_path: Path, limits: UploadLimits, error: type[Exception], needle: str
) -> None:
    archive = tmp_path / "b.tar.gz"
    archive.write_bytes(pack(BUNDLES / "1"))
    with pytest.raises(error, match=needle):
        unpack(archive, tmp_path / "out", limits)


def test_a_giant_pax_header_cannot_exhaust_memory(tmp_path: Path) -> None:
    # tarfile reads a pax header whole; the capped stream stops it at the unpacked limit
    info = tarfile.TarInfo("x")
    info.pax_headers = {"comment": "A" * 3_000_000}
    archive = tmp_path / "b.tar.gz"
    archive.write_bytes(_tar_gz((info, b"")))
    with pytest.raises(BundleTooLargeError, match="unpacks to more"):
        unpack(archive, tmp_path / "out", LIMITS)


def test_a_crashed_upload_is_cleaned_up_at_start(
    settings: FleetSettings, launch: Callable[[FastAPI], str]
) -> None:
    stale = settings.data_dir / "uploads" / "0123456789abcdef"
    (stale / "unpacked").mkdir(parents=True)
    (stale / "bundle.tar.gz").write_bytes(b"half")
    launch(create_app(settings))
    assert not stale.exists()
