"""The ``fleet`` commands of this part: ``token`` (bootstrapping the first admin on the database),
``enroll-token``, and ``serve`` as a real process (health, docs, metrics, JSON logs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from fleet.cli import main
from fleet.server import free_port
from fleet.settings import FleetSettings


@pytest.fixture
def clock() -> Callable[[], datetime]:
    """The commands use wall time, so the app here does too."""
    return lambda: datetime.now(UTC)


@pytest.fixture
def config(tmp_path: Path, settings: FleetSettings) -> Path:
    """A config file pointing at the same data dir as the ``settings`` fixture."""
    path = tmp_path / "fleet.toml"
    path.write_text(f'data_dir = "{settings.data_dir}"\n')
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bootstrap_the_first_admin_then_use_the_api(
    capsys: pytest.CaptureFixture[str], config: Path, app: FastAPI, http: httpx.Client
) -> None:
    code, out, err = run(
        capsys, "token", "create", "--role", "admin", "--name", "root", "--config", str(config)
    )
    assert code == 0
    secret = out.strip()
    assert secret.startswith("efo_") and "\n" not in secret  # stdout is the secret alone
    assert "shown only now" in err
    admin = {"Authorization": f"Bearer {secret}"}
    assert http.get("/v1/whoami", headers=admin).json()["role"] == "admin"
    # the CLI's own action is in the audit log, by the local user
    entry = http.get("/v1/audit", params={"action": "token.create"}, headers=admin).json()
    assert entry["items"][0]["actor"].startswith("cli:")

    code, out, _ = run(capsys, "token", "list", "--config", str(config))
    assert code == 0 and "root" in out and "admin" in out and secret not in out
    token_id = out.splitlines()[1].split()[0]
    code, _, err = run(capsys, "token", "revoke", token_id, "--config", str(config))
    assert code == 2 and "last active admin token" in err  # one line, no traceback
    assert "Traceback" not in err


def test_token_commands_explain_mistakes(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, _, err = run(capsys, "token", "revoke", "tok-000000000000", "--config", str(config))
    assert code == 2 and "no API token 'tok-000000000000'" in err
    with pytest.raises(SystemExit):
        main(["token", "create", "--role", "root", "--name", "x", "--config", str(config)])
    assert "invalid choice" in capsys.readouterr().err
    code, _, err = run(capsys, "token", "list", "--config", str(config) + ".missing")
    assert code == 2 and "does not exist" in err


def test_enroll_token_commands(
    capsys: pytest.CaptureFixture[str], config: Path, tuf_repo: object, http: httpx.Client
) -> None:
    code, out, err = run(
        capsys,
        "enroll-token",
        "create",
        "--uses",
        "2",
        "--expires",
        "2h",
        "--group",
        "plant-3",
        "--tag",
        "line=a",
        "--tag",
        "cam",
        "--config",
        str(config),
    )
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("efe_") and "2 use(s)" in err and "group plant-3" in err
    body = {
        "token": secret,
        "public_key": "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "profile": "rpi4-aarch64",
        "facts": {"arch": "aarch64", "ram_mb": 2048, "agent_version": "0.1.0"},
    }
    r = http.post("/v1/enroll", json=body)
    assert r.status_code == 201, r.text
    assert (r.json()["group"], r.json()["tags"]) == ("plant-3", ["cam", "line=a"])

    code, out, _ = run(capsys, "enroll-token", "list", "--config", str(config))
    assert code == 0 and "1/2" in out and "usable" in out and "plant-3" in out
    token_id = out.splitlines()[1].split()[0]
    assert run(capsys, "enroll-token", "revoke", token_id, "--config", str(config))[0] == 0
    code, out, _ = run(capsys, "enroll-token", "list", "--usable", "--config", str(config))
    assert token_id not in out
    assert http.post("/v1/enroll", json=body).status_code == 401

    code, _, err = run(
        capsys, "enroll-token", "create", "--expires", "30s", "--config", str(config)
    )
    assert code == 2 and "must expire between" in err
    code, _, err = run(capsys, "enroll-token", "create", "--expires", "1y", "--config", str(config))
    assert code == 2 and "--expires: '1y' is not a duration" in err


def test_serve_runs_the_api_with_json_logs(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")},
        "EDGEFLEET_DATA_DIR": str(tmp_path / "data"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                health = httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "fleet serve did not come up"
                time.sleep(0.1)
        assert health.json()["status"] == "ok" and health.json()["schema_version"] >= 2
        assert httpx.get(f"{url}/docs").status_code == 200
        assert httpx.get(f"{url}/v1/devices").status_code == 401
        metrics = httpx.get(f"{url}/metrics").text
        assert 'edgefleet_http_requests_total{method="GET",route="/v1/devices",status="401"}' in (
            metrics
        )
        assert "edgefleet_devices" in metrics or "edgefleet_http_request_duration" in metrics
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert (tmp_path / "data" / "fleet.db").exists()
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines, "no log output"
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= set(line), line
    requests = [r for r in lines if r["logger"] == "fleet.http"]
    refused = [r for r in requests if r.get("status") == 401]
    assert refused and refused[0]["route"] == "/v1/devices" and refused[0]["method"] == "GET"
    assert any("migration" in r for r in lines)
