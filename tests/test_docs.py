"""The README documents every CLI command and every HTTP endpoint of the fleet manager.

Walks the real argparse trees of ``edge-agent`` and ``fleet`` and the fleet app's served routes,
so a command or route added without documentation fails here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from agent import commands as agent_commands
from fleet import commands as fleet_commands
from fleet.app import create_app
from fleet.settings import load_settings
from protocol.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# Routes FastAPI adds for its own docs pages.
FRAMEWORK_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def leaf_commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix
        return
    for name, sub in subs[0].choices.items():
        yield from leaf_commands(sub, f"{prefix} {name}")


def cli_commands() -> list[str]:
    found = []
    for prog, package in (("edge-agent", agent_commands), ("fleet", fleet_commands)):
        found += leaf_commands(build_parser(prog, "", package), prog)
    return sorted(found)


def _norm(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def routes(tmp: Path) -> list[tuple[str, str]]:
    app = create_app(load_settings(data_dir=str(tmp)))
    found = set()
    for ctx in iter_route_contexts(app.routes):
        if ctx.path in FRAMEWORK_ROUTES:
            continue
        if isinstance(ctx.original_route, APIRoute):
            for method in ctx.methods or set():
                if method not in {"HEAD", "OPTIONS"}:
                    found.add((method, ctx.path))
    return sorted(found)


def documented_routes() -> set[tuple[str, str]]:
    rows = re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE)` \| `([^`]+)` \|", README, re.M)
    return {(method, _norm(path)) for method, path in rows}


@pytest.mark.parametrize("command", cli_commands())
def test_cli_command_is_documented(command: str) -> None:
    assert re.search(rf"(^|\s|`){re.escape(command)}(\s|`|$)", README, re.M), (
        f"`{command}` is not in README.md: document what it does and how to use it"
    )


def test_every_endpoint_is_documented(tmp_path: Path) -> None:
    documented = documented_routes()
    missing = [f"{m} {p}" for m, p in routes(tmp_path) if (m, _norm(p)) not in documented]
    assert not missing, "endpoints missing from the README's API table: " + ", ".join(missing)


def test_the_api_table_names_no_endpoint_that_does_not_exist(tmp_path: Path) -> None:
    served = {(m, _norm(p)) for m, p in routes(tmp_path)}
    stale = sorted(f"{m} {p}" for m, p in documented_routes() - served)
    assert not stale, "the README's API table lists endpoints the app does not serve: " + ", ".join(
        stale
    )
