"""``fleet enroll-token``: create, list and revoke device enrollment tokens on the database.

``create`` prints the secret once on stdout; hand it to the installer, who passes it to the
agent's provisioning command. The same is available as ``POST /v1/enrollment-tokens`` (admin).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from fleet.cli_support import add_config_flag, cli_actor, database, settings_from
from fleet.enrollment import EnrollmentService, EnrollmentTokenSpec
from fleet.settings import parse_duration
from protocol.cli import CommandError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("enroll-token", help="manage device enrollment tokens")
    sub = parser.add_subparsers(dest="enroll_command", metavar="ACTION", required=True)

    create = sub.add_parser(
        "create",
        help="create an enrollment token and print its secret (once)",
        description="Create an enrollment token: single-use by default, expiring, optionally "
        "putting every device enrolled with it into a group and tagging it.",
    )
    add_config_flag(create)
    create.add_argument("--uses", type=int, default=1, help="how many devices (default 1)")
    create.add_argument("--expires", default="24h", help="lifetime: 30m, 24h, 7d ... (default 24h)")
    create.add_argument("--group", help="group given to enrolled devices")
    create.add_argument(
        "--tag", action="append", default=[], help="tag given to enrolled devices (repeatable)"
    )
    create.add_argument("--note", default="", help="what or where the token is for")
    create.set_defaults(handler=create_token)

    listing = sub.add_parser("list", help="list enrollment tokens")
    add_config_flag(listing)
    listing.add_argument("--usable", action="store_true", help="only tokens that still work")
    listing.set_defaults(handler=list_tokens)

    revoke = sub.add_parser("revoke", help="revoke an enrollment token")
    add_config_flag(revoke)
    revoke.add_argument("token_id", metavar="ID", help="enrollment token id (enr-...)")
    revoke.set_defaults(handler=revoke_token)


def create_token(args: argparse.Namespace) -> int:
    try:
        expires_in = parse_duration(args.expires)
    except ValueError as exc:
        raise CommandError(f"--expires: {exc}") from None
    spec = EnrollmentTokenSpec(
        uses=args.uses,
        expires_in=expires_in,
        group=args.group,
        tags=tuple(args.tag),
        note=args.note,
    )
    with database(settings_from(args)) as db:
        issued = EnrollmentService(db).create_token(spec, cli_actor(), datetime.now(UTC))
    info = issued.info
    print(issued.secret)
    where = f" group {info.group}" if info.group else ""
    tags = f" tags {','.join(info.tags)}" if info.tags else ""
    print(
        f"created enrollment token {info.id}: {info.uses_total} use(s), expires "
        f"{info.expires_at:%Y-%m-%d %H:%M} UTC{where}{tags}; the secret above is shown only now",
        file=sys.stderr,
    )
    return 0


def list_tokens(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    with database(settings_from(args)) as db:
        tokens = EnrollmentService(db).list_tokens(usable_at=now if args.usable else None)
    print(f"{'ID':<17} {'USES':<11} {'EXPIRES (UTC)':<18} {'STATE':<8} {'GROUP':<12} TAGS")
    for t in tokens:
        state = "revoked" if t.revoked_at else "usable" if t.usable(now) else "spent"
        if not t.revoked_at and now >= t.expires_at:
            state = "expired"
        uses = f"{t.uses_total - t.uses_left}/{t.uses_total}"
        print(
            f"{t.id:<17} {uses:<11} {t.expires_at:%Y-%m-%d %H:%M}  {state:<8} "
            f"{t.group or '-':<12} {','.join(t.tags) or '-'}"
        )
    return 0


def revoke_token(args: argparse.Namespace) -> int:
    with database(settings_from(args)) as db:
        token = EnrollmentService(db).revoke_token(args.token_id, cli_actor(), datetime.now(UTC))
    print(f"revoked enrollment token {token.id}")
    return 0
