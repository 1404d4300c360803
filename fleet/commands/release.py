"""``fleet release``: upload a model bundle to a running fleet manager and read its releases.

* ``fleet release upload BUNDLE_DIR`` packs the bundle directory (``.tar.gz``) and posts it to
  ``POST /v1/models``: the server validates it (hashes, golden replay in each runtime, signature,
  reference profile, sizes) and publishes it as a signed release, or says what is wrong.
* ``fleet release list [--model NAME]`` and ``fleet release show NAME VERSION`` read the registry.

They talk HTTP to the server named by ``--server`` / ``$EDGEFLEET_SERVER`` with the API token of
``--token`` / ``$EDGEFLEET_TOKEN`` (operator for upload, viewer for reading). A refusal prints
the server's reason and exits 2. (``fleet models build/check`` work on local bundle
directories; this group is about the server's registry.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from fleet.bundle_upload import pack
from protocol.cli import CommandError

SERVER_ENV = "EDGEFLEET_SERVER"
TOKEN_ENV = "EDGEFLEET_TOKEN"
DEFAULT_SERVER = "http://127.0.0.1:8080"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("release", help="upload model bundles and read releases")
    sub = parser.add_subparsers(dest="release_command", metavar="ACTION", required=True)

    upload = sub.add_parser(
        "upload",
        help="validate and publish a bundle directory as a release",
        description="Pack BUNDLE_DIR and upload it; the server validates it (every file's "
        "hash, each artifact's golden set in its runtime, one input/output signature, the "
        "reference profile, size limits) and publishes it as a signed release. The version in "
        "bundle.json must be greater than the model's latest.",
    )
    add_server_flags(upload)
    upload.add_argument("bundle_dir", type=Path, metavar="BUNDLE_DIR")
    upload.set_defaults(handler=upload_release)

    listing = sub.add_parser("list", help="list releases")
    add_server_flags(listing)
    listing.add_argument("--model", default=None, help="only this model's releases")
    listing.set_defaults(handler=list_releases)

    show = sub.add_parser("show", help="one release: files, targets, thresholds")
    add_server_flags(show)
    show.add_argument("name", metavar="NAME")
    show.add_argument("version", type=int, metavar="VERSION")
    show.add_argument("--json", action="store_true", help="print the release as JSON")
    show.set_defaults(handler=show_release)


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=None,
        help=f"fleet manager URL (default: ${SERVER_ENV}, else {DEFAULT_SERVER})",
    )
    parser.add_argument("--token", default=None, help=f"API token (default: ${TOKEN_ENV})")


def client(args: argparse.Namespace, timeout: float = 30.0) -> httpx.Client:
    server = args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise CommandError(
            f"no API token: pass --token or set {TOKEN_ENV} (an admin creates one with "
            "`fleet token create --role operator --name NAME`)"
        )
    return httpx.Client(
        base_url=server.rstrip("/"),
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
    )


def call(http: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        r = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise CommandError(
            f"cannot reach the fleet manager at {http.base_url} ({exc}); check --server / "
            f"{SERVER_ENV}"
        ) from exc
    if r.is_error:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise CommandError(f"HTTP {r.status_code}: {detail}")
    return r.json()


def upload_release(args: argparse.Namespace) -> int:
    directory: Path = args.bundle_dir
    if not (directory / "bundle.json").is_file():
        raise CommandError(
            f"{directory} is not a bundle directory (no bundle.json); build one with "
            "`fleet models build`"
        )
    body = pack(directory)
    print(f"uploading {directory} ({len(body)} bytes packed)", file=sys.stderr)
    with client(args, timeout=600.0) as http:
        got = call(
            http, "POST", "/v1/models", content=body, headers={"Content-Type": "application/gzip"}
        )
    release, t = got["release"], got["timings"]
    print(
        f"published {release['model']} v{release['version']} (TUF targets "
        f"v{release['targets_version']}; validated in {t['validate']:.2f}s, signed in "
        f"{t['sign']:.2f}s)"
    )
    for f in release["files"]:
        print(f"  {f['kind']:<9} {f['target_path']}  {f['length']} bytes")
    return 0


def list_releases(args: argparse.Namespace) -> int:
    with client(args) as http:
        if args.model:
            releases = call(http, "GET", f"/v1/models/{args.model}/releases")
        else:
            releases = []
            for model in call(http, "GET", "/v1/models"):
                releases += call(http, "GET", f"/v1/models/{model['name']}/releases")
    print(f"{'MODEL':<24} {'VERSION':>7} {'STATUS':<10} {'ARTIFACTS':>9} {'CREATED':<17} BY")
    for r in releases:
        artifacts = sum(1 for f in r["files"] if f["kind"] == "artifact")
        created = r["created_at"][:16].replace("T", " ")
        print(
            f"{r['model']:<24} {r['version']:>7} {r['status']:<10} {artifacts:>9} "
            f"{created:<17} {r['created_by_name'] or r['created_by']}"
        )
    return 0


def show_release(args: argparse.Namespace) -> int:
    with client(args) as http:
        r = call(http, "GET", f"/v1/models/{args.name}/releases/{args.version}")
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True))
        return 0
    meta = r["metadata"]
    print(f"{r['model']} v{r['version']} ({r['status']}), TUF targets v{r['targets_version']}")
    print(f"created {r['created_at']} by {r['created_by_name'] or r['created_by']}")
    print(f"input  {meta['input']['name']} {meta['input']['dtype']} {meta['input']['shape']}")
    print(f"output {meta['output']['name']} {meta['output']['dtype']} {meta['output']['shape']}")
    print("files:")
    for f in r["files"]:
        extra = f"  {f['runtime']} {f['quantization']}" if f["kind"] == "artifact" else ""
        print(f"  {f['kind']:<9} {f['target_path']}  sha256 {f['sha256'][:16]}{extra}")
    print("health thresholds:")
    for key, value in sorted(meta.get("health", {}).items()):
        print(f"  {key} = {value}")
    return 0


# the names before they were public (other command modules may still import them)
_add_server_flags = add_server_flags
_client = client
_call = call
