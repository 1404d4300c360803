"""``fleet token``: create, list and revoke operator API tokens directly on the database.

This is how the first admin token is made (no server needed); later tokens can also be made
through ``POST /v1/tokens``. Every change is audited as ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from fleet.cli_support import add_config_flag, cli_actor, database, settings_from
from fleet.tokens import Role, TokenService


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("token", help="manage operator API tokens")
    sub = parser.add_subparsers(dest="token_command", metavar="ACTION", required=True)

    create = sub.add_parser(
        "create",
        help="create a token and print its secret (once)",
        description="Create an API token. The secret is printed once on stdout; only its hash "
        "is stored.",
    )
    add_config_flag(create)
    create.add_argument("--name", required=True, help="who or what the token is for")
    create.add_argument(
        "--role", required=True, choices=[r.value for r in Role], help="viewer, operator, admin"
    )
    create.set_defaults(handler=create_token)

    listing = sub.add_parser("list", help="list tokens (never their secrets)")
    add_config_flag(listing)
    listing.add_argument("--active", action="store_true", help="hide revoked tokens")
    listing.set_defaults(handler=list_tokens)

    revoke = sub.add_parser("revoke", help="revoke a token at once")
    add_config_flag(revoke)
    revoke.add_argument("token_id", metavar="ID", help="token id (tok-...), see `fleet token list`")
    revoke.set_defaults(handler=revoke_token)


def create_token(args: argparse.Namespace) -> int:
    with database(settings_from(args)) as db:
        issued = TokenService(db).create(args.name, args.role, cli_actor(), datetime.now(UTC))
    print(issued.secret)
    print(
        f"created {issued.info.role} token {issued.info.id} ({issued.info.name}); the secret "
        "above is shown only now: send it as `Authorization: Bearer <secret>`",
        file=sys.stderr,
    )
    return 0


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


def list_tokens(args: argparse.Namespace) -> int:
    with database(settings_from(args)) as db:
        tokens = TokenService(db).list(include_revoked=not args.active)
    print(f"{'ID':<17} {'ROLE':<9} {'STATUS':<8} {'CREATED':<17} {'LAST USED':<17} NAME")
    for t in tokens:
        state = "active" if t.active else "revoked"
        print(
            f"{t.id:<17} {t.role:<9} {state:<8} {_when(t.created_at):<17} "
            f"{_when(t.last_used_at):<17} {t.name}"
        )
    return 0


def revoke_token(args: argparse.Namespace) -> int:
    with database(settings_from(args)) as db:
        token = TokenService(db).revoke(args.token_id, cli_actor(), datetime.now(UTC))
    print(f"revoked {token.id} ({token.name}, {token.role})")
    return 0
