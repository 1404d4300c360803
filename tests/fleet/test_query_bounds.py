"""Numbers and times in URLs that the database or datetime cannot hold are refused with a 422
naming the parameter, never a 500 (both found by the long schemathesis run)."""

from __future__ import annotations

import httpx
import pytest

HUGE = str(2**63)


@pytest.mark.parametrize(
    "path",
    [
        f"/v1/models/m/releases/{HUGE}",
        f"/v1/drift/merged/m/{HUGE}",
        "/v1/models/m/releases/0",
    ],
)
def test_a_version_outside_sqlite_integers_is_422(
    http: httpx.Client, operator: dict[str, str], path: str
) -> None:
    r = http.get(path, headers=operator)
    assert r.status_code == 422, r.text
    assert "version" in r.text


@pytest.mark.parametrize(
    "query",
    [
        "/v1/audit?since=0001-01-01T00:00:00%2B01:00",
        "/v1/audit?until=9999-12-31T23:59:59-05:00",
        "/v1/drift/merged/m/1?until=0001-01-01T00:00:00",
        "/v1/devices/d1/drift?since=9999-12-31T23:00:00",
    ],
)
def test_a_time_at_the_ends_of_the_calendar_is_422(
    http: httpx.Client, operator: dict[str, str], query: str
) -> None:
    r = http.get(query, headers=operator)
    assert r.status_code == 422, r.text
    assert "time out of range" in r.text


def test_ordinary_times_still_work(http: httpx.Client, operator: dict[str, str]) -> None:
    r = http.get(
        "/v1/audit?since=2020-01-01T00:00:00Z&until=2030-01-01T00:00:00%2B02:00", headers=operator
    )
    assert r.status_code == 200, r.text
