"""Write docs/dashboard.png: the dashboard's drift page for a sample fleet, in headless Chromium.

Builds a throwaway fleet database (a sample fleet written through the real ingestion writer,
one device drifting, one offline; alerts evaluated), serves the real fleet app on loopback,
signs a browser session in with a viewer token and screenshots the page. Fails if the page
logs a console error or shows no charts.

    .venv/bin/python scripts/screenshot_dashboard.py [--page drift|devices|device] [--out PATH]

With ``--fleet URL --token TOKEN --path /dashboard/...`` it screenshots a page of a running
fleet instead (the demo prints its URL and a token), e.g. ``docs/demo.png``:

    .venv/bin/python scripts/screenshot_dashboard.py --fleet http://127.0.0.1:8642 \
        --token efo_... --path /dashboard/rollouts/ro-... --max-height 1500 --out docs/demo.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleet.alert_service import AlertService  # noqa: E402
from fleet.app import create_app  # noqa: E402
from fleet.audit import Actor  # noqa: E402
from fleet.dashboard.headless import Browser, PageResult  # noqa: E402
from fleet.dashboard.sample_fleet import seed  # noqa: E402
from fleet.dashboard.session import COOKIE  # noqa: E402
from fleet.server import BackgroundServer  # noqa: E402
from fleet.settings import load_settings  # noqa: E402
from fleet.store import connect, migrate  # noqa: E402
from fleet.tokens import TokenService  # noqa: E402

NOW = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
PAGES = {
    "drift": "/dashboard/drift/load-model/1?hours=7&canary=cam-3",
    "devices": "/dashboard",
    "device": "/dashboard/devices/cam-3?hours=7",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--page", choices=sorted(PAGES), default="drift")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--fleet", help="a running fleet's URL to screenshot instead of a sample")
    parser.add_argument("--token", help="with --fleet: an API token to sign in with")
    parser.add_argument("--path", default="/dashboard", help="with --fleet: the page's path")
    parser.add_argument("--max-height", type=int, default=6000, help="crop the page (pixels)")
    args = parser.parse_args()
    if args.fleet:
        if not args.token:
            parser.error("--fleet needs --token (the demo prints one)")
        with Browser() as browser:
            browser.set_cookie(COOKIE, args.token, args.fleet + "/dashboard")
            page = browser.open(args.fleet + args.path, max_height=args.max_height)
        return _write(page, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=Path(tmp) / "data", mqtt={"port": 1})
        app = create_app(settings, clock=lambda: NOW)
        with closing(connect(settings.db_path)) as db:
            migrate(db)
            seed(
                db,
                settings,
                NOW,
                devices=("cam-1", "cam-2", "cam-3", "cam-4"),
                drifting=("cam-3",),
                offline=("cam-4",),
            )
            AlertService(db, settings).evaluate(NOW)
            token = TokenService(db).create("docs", "viewer", Actor.cli("docs"), NOW).secret
        with BackgroundServer(app) as server, Browser() as browser:
            browser.set_cookie(COOKIE, token, server.url + "/dashboard")
            page = browser.open(server.url + PAGES[args.page], max_height=args.max_height)
    return _write(page, args.out)


def _write(page: PageResult, out: Path) -> int:
    if page.errors or not page.charts:
        print(
            f"refusing to write a broken screenshot: {page.errors or 'no charts'}", file=sys.stderr
        )
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(page.screenshot)
    print(f"wrote {out} ({page.charts} charts, {len(page.screenshot)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
