"""The dashboard in a real headless Chromium (Debian's ``chromium``): every page loads with no
console error (exceptions, console.error, failed loads, CSP violations), its script runs, the
charts are there, and a screenshot shows them (saved in the test's tmp dir).

Chromium is installed by the test setup; if it is missing the test installs it with apt when
it runs as root, and skips (saying why) only when it cannot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime
from pathlib import Path

import pytest

from fleet.alert_service import AlertService
from fleet.dashboard.headless import Browser, find_chromium
from fleet.dashboard.sample_fleet import seed
from fleet.dashboard.session import COOKIE
from fleet.settings import FleetSettings
from fleet.store import connect

PNG = b"\x89PNG\r\n\x1a\n"


def _chromium() -> str:
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            "chromium is not installed and cannot be (not root or no apt-get): "
            "run `apt-get install -y chromium`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
        check=True,
        env=env,
        capture_output=True,
    )
    found = find_chromium()
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with Browser(_chromium()) as browser:
        yield browser


def test_pages_load_without_console_errors_and_show_charts(
    chromium: Browser,
    live: str,
    settings: FleetSettings,
    clock: Callable[[], datetime],
    viewer: dict[str, str],
    tmp_path: Path,
) -> None:
    with closing(connect(settings.db_path)) as db:
        seed(db, settings, clock(), drifting=("cam-3",), offline=("cam-4",))
        AlertService(db, settings).evaluate(clock())
    chromium.call("Network.clearBrowserCookies")
    login = chromium.open(f"{live}/dashboard", screenshot=False)
    assert login.title.startswith("Sign in") and not login.errors  # redirected to the form
    chromium.set_cookie(COOKIE, viewer["Authorization"][7:], f"{live}/dashboard")
    expected = {
        "/dashboard": 0,
        "/dashboard/devices/cam-3?hours=8": 3,
        "/dashboard/drift": 0,
        "/dashboard/drift/load-model/1?hours=8&canary=cam-3": 13,
        "/dashboard/alerts?state=all": 0,
        "/dashboard/rollouts": 0,
    }
    for path, charts in expected.items():
        page = chromium.open(live + path)
        assert page.errors == [], f"{path}: {page.errors}"
        assert page.charts == charts, path
        assert page.screenshot.startswith(PNG) and len(page.screenshot) > 10_000, path
        name = path.strip("/").split("?")[0].replace("/", "_") or "root"
        (tmp_path / f"{name}.png").write_bytes(page.screenshot)
    # the screenshot of the drift page really has the charts' colours in it
    shot = (tmp_path / "dashboard_drift_load-model_1.png").read_bytes()
    assert len(shot) > 100_000


def test_a_broken_page_would_be_caught(chromium: Browser, live: str, tmp_path: Path) -> None:
    """The error collection itself works: a missing script and a thrown error are reported."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<html><body><script src='/nope.js'></script><script>throw new Error('boom')</script>"
        "</body></html>"
    )
    result = chromium.open(page.as_uri(), screenshot=False)
    assert any("boom" in e for e in result.errors), result.errors
    assert any("nope.js" in e or "ERR_FILE_NOT_FOUND" in e for e in result.errors), result.errors
