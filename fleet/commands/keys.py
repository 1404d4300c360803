"""``fleet keys``: create, show, rotate and revoke the TUF signing keys; keep metadata fresh.

* ``init``        keys for every role and the repository's first metadata (root v1)
* ``show``        key ids, thresholds, versions and expiries of every role
* ``rotate``      replace a role's key (a new root version signed by the offline root key)
* ``revoke``      remove one key id from a role, generating a replacement if it was the last
* ``refresh``     re-sign whatever is close to expiry (what the scheduled job does)
* ``renew-root``  a new root version with a fresh expiry (offline root key)
* ``tls``         the fleet TLS CA (created once) and the broker's/API's server certificates
                  (``init --broker-host``/``--fleet-host`` does it too)

Paths: ``--dir`` (the key directory) and ``--repo`` (the repository directory), by default
the fleet settings' ``<data_dir>/keys`` and ``<data_dir>/tuf`` (``--config`` or environment).
The logic lives in :mod:`fleet.keys` and :mod:`fleet.tuf_repo`; this module parses arguments,
writes key files in a crash-safe order and prints.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner

from fleet.cli_support import add_config_flag, settings_from
from fleet.errors import FleetError, SigningKeyExistsError
from fleet.keys import (
    ONLINE_ROLES,
    ROLES,
    ROOT,
    generate_key,
    init_key_dir,
    key_path,
    load_key,
    load_online_keys,
    write_key,
)
from fleet.tls import TlsPaths, issue_server_cert, load_or_create_ca, write_pair
from fleet.tuf_repo import TufRepository
from protocol.cli import CommandError


def _paths(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int]) -> None:
    """``--dir``/``--repo``, defaulting to the fleet settings' ``keys_dir``/``tuf_dir`` (the
    directories ``fleet serve`` uses), and the handler that fills them in."""
    add_config_flag(parser)
    parser.add_argument(
        "--dir", type=Path, metavar="DIR", help="key directory (default: <data_dir>/keys)"
    )
    parser.add_argument(
        "--repo",
        type=Path,
        metavar="REPO",
        help="TUF repository (default: <data_dir>/tuf)",
    )

    def with_paths(args: argparse.Namespace) -> int:
        if args.dir is None or args.repo is None:
            settings = settings_from(args)
            args.dir = args.dir or settings.keys_dir
            args.repo = args.repo or settings.tuf_dir
        return handler(args)

    parser.set_defaults(handler=with_paths)


def _root_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root-key",
        type=Path,
        required=True,
        metavar="PATH",
        help="the offline root key (PEM), e.g. on a mounted USB stick",
    )


def _tls_hosts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-dir", type=Path, metavar="DIR", help="TLS CA and certificates (<data_dir>/tls)"
    )
    parser.add_argument(
        "--broker-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a name or IP devices reach the broker at (repeat); issues broker.pem/broker.key "
        "signed by the fleet CA (created in the TLS directory if there is none)",
    )
    parser.add_argument(
        "--fleet-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a name or IP of the fleet API (repeat); issues fleet.pem/fleet.key for HTTPS",
    )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="TUF signing keys and repository metadata")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    p = sub.add_parser("init", help="create all keys and the repository's first metadata")
    _paths(p, init)
    p.add_argument("--force", action="store_true", help="replace existing keys and metadata")

    _tls_hosts(p)

    p = sub.add_parser(
        "tls",
        help="the fleet TLS CA (created once) and server certificates for the broker and API",
    )
    add_config_flag(p)
    _tls_hosts(p)
    p.set_defaults(handler=tls)

    p = sub.add_parser("show", help="key ids, versions and expiries of every role")
    _paths(p, show)

    p = sub.add_parser("rotate", help="replace a role's key (new root version)")
    p.add_argument("role", choices=ROLES)
    _paths(p, rotate)
    _root_key(p)
    p.add_argument(
        "--new-root-key",
        type=Path,
        metavar="PATH",
        help="where to write the new root key (required when rotating the root role)",
    )

    p = sub.add_parser("revoke", help="remove a key id from a role (new root version)")
    p.add_argument("role", choices=ROLES)
    p.add_argument("keyid", help="the key id (or its first 8+ characters)")
    _paths(p, revoke)
    _root_key(p)
    p.add_argument(
        "--new-root-key",
        type=Path,
        metavar="PATH",
        help="where to write the replacement root key (when revoking the only root key)",
    )

    p = sub.add_parser("refresh", help="re-sign timestamp/snapshot/targets close to expiry")
    _paths(p, refresh)

    p = sub.add_parser("renew-root", help="a new root version with a fresh expiry")
    _paths(p, renew_root)
    _root_key(p)


def _now() -> datetime:
    return datetime.now(UTC)


def _repo(args: argparse.Namespace) -> TufRepository:
    return TufRepository(args.repo, load_online_keys(args.dir))


def init(args: argparse.Namespace) -> int:
    signers = init_key_dir(args.dir, force=args.force)
    repo = TufRepository(args.repo, {r: signers[r] for r in ONLINE_ROLES})
    repo.init(signers[ROOT], _now(), force=args.force)
    print(f"keys written to {args.dir} (mode 0600):")
    for role in ROLES:
        print(f"  {role:9} {signers[role].public_key.keyid}  {key_path(args.dir, role)}")
    print(f"TUF repository initialised in {args.repo}")
    print(f"devices pin its root: {args.repo / 'metadata' / '1.root.json'}")
    print()
    print(f"MOVE THE ROOT KEY OFFLINE NOW: copy {key_path(args.dir, ROOT)} to offline storage")
    print("(and a backup), then delete it from this server. The server never needs it; it")
    print("signs only key rotations (`fleet keys rotate ... --root-key PATH`).")
    if args.broker_host or args.fleet_host:
        print()
        return tls(args)
    return 0


def tls(args: argparse.Namespace) -> int:
    if not args.broker_host and not args.fleet_host:
        raise CommandError("name the broker (--broker-host HOST) and/or the API (--fleet-host)")
    paths = TlsPaths(args.tls_dir or settings_from(args).tls_dir)
    now = _now()
    ca, created = load_or_create_ca(paths, now)
    if created:
        print(f"fleet CA created: {paths.ca_cert} (key {paths.ca_key}, mode 0600)")
    else:
        print(f"fleet CA: {paths.ca_cert}")
    for name, hosts in (("broker", args.broker_host), ("fleet", args.fleet_host)):
        if hosts:
            cert, key = issue_server_cert(ca, hosts, now)
            write_pair(paths.cert(name), paths.key(name), cert, key)
            print(f"{name} certificate for {', '.join(hosts)}: {paths.cert(name)}")
    print("devices pin the CA at enrollment: set broker.tls = true (and tls.certfile/keyfile")
    print(f"to {paths.cert('fleet')}/{paths.key('fleet')} for HTTPS); see deploy/README.md")
    return 0


def show(args: argparse.Namespace) -> int:
    repo = _repo(args)
    now = _now()
    print(f"repository {args.repo} (root v{repo.root_version()})")
    for st in repo.status():
        left = st.expires - now
        state = (
            "EXPIRED" if left.total_seconds() <= 0 else f"in {left.days}d {left.seconds // 3600}h"
        )
        print(
            f"{st.role:9} v{st.version:<5} expires {st.expires:%Y-%m-%d %H:%M}Z ({state}), "
            f"threshold {st.threshold}"
        )
        for keyid in st.keyids:
            mark = (
                "  <- online key in " + str(key_path(args.dir, st.role))
                if keyid == st.signer_keyid
                else ""
            )
            print(f"    {keyid}{mark}")
        if st.role != ROOT and st.signer_keyid not in st.keyids:
            print(f"    WARNING: {key_path(args.dir, st.role)} is not a key of this role")
    if key_path(args.dir, ROOT).exists():
        where = key_path(args.dir, ROOT)
        print(f"WARNING: the root key is still on this server ({where}); move it offline")
    return 0


def _stage_online_key(key_dir: Path, role: str) -> tuple[CryptoSigner, Path]:
    """A new key saved beside the current one as ``<role>.pem.new`` before the root changes,
    so a crash between the two never loses the key the new root names."""
    signer = generate_key()
    staged = key_path(key_dir, role).with_name(f"{role}.pem.new")
    write_key(staged, signer, overwrite=True)
    return signer, staged


def _new_root_key(path: Path | None) -> CryptoSigner:
    if path is None:
        raise CommandError("rotating the root key needs --new-root-key PATH (kept offline too)")
    signer = generate_key()
    try:
        write_key(path, signer)
    except SigningKeyExistsError as exc:
        raise CommandError(f"{exc}; choose a new file for the new root key") from exc
    return signer


def _replace_key(
    args: argparse.Namespace, role: str, apply: Any, allow_no_new: bool = False
) -> None:
    root_signer = load_key(args.root_key, ROOT)
    repo = _repo(args)
    if role == ROOT:
        if allow_no_new and args.new_root_key is None:
            new, staged = None, None
        else:
            new, staged = _new_root_key(args.new_root_key), None
    else:
        new, staged = _stage_online_key(args.dir, role)
    try:
        version = apply(repo, new, root_signer)
    except BaseException:
        # Keep the new key only if a root naming it was written; otherwise it is litter.
        if new is not None and not _named_by_root(repo, role, new):
            (staged or args.new_root_key).unlink(missing_ok=True)
        raise
    if staged is not None:
        os.replace(staged, key_path(args.dir, role))
    print(f"root v{version} published; devices follow it on their next update check")
    if new is not None:
        where = args.new_root_key if role == ROOT else key_path(args.dir, role)
        print(f"new {role} key {new.public_key.keyid} in {where}")
        if role == ROOT:
            print(f"keep {where} offline; the old root key is no longer needed")


def _named_by_root(repo: TufRepository, role: str, signer: CryptoSigner) -> bool:
    try:
        return signer.public_key.keyid in repo.root().roles[role].keyids
    except (FleetError, OSError):
        return True  # cannot tell: keep the key rather than risk losing it


def rotate(args: argparse.Namespace) -> int:
    _replace_key(
        args,
        args.role,
        lambda repo, new, root_signer: repo.rotate_key(args.role, new, root_signer, _now()),
    )
    return 0


def revoke(args: argparse.Namespace) -> int:
    def apply(repo: TufRepository, new: CryptoSigner | None, root_signer: CryptoSigner) -> int:
        return repo.revoke_key(args.role, args.keyid, root_signer, _now(), replacement=new)

    _replace_key(args, args.role, apply, True)
    return 0


def refresh(args: argparse.Namespace) -> int:
    signed = _repo(args).refresh_timestamp(_now())
    print(f"re-signed: {', '.join(signed)}" if signed else "nothing close to expiry")

    return 0


def renew_root(args: argparse.Namespace) -> int:
    version = _repo(args).renew_root(load_key(args.root_key, ROOT), _now())
    print(f"root v{version} published")

    return 0
