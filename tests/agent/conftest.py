"""The ``implementation`` fixture: run a test once on the C predict path (agent._fastpath) and
once on its pure-Python twin, so that any difference in behaviour between the two fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent import fastpath

IMPLEMENTATIONS = ("native", "python")


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """Objects built during the test use the C extension ("native") or pure Python."""
    if request.param == "native" and fastpath.native() is None:
        pytest.skip("agent._fastpath is not built here (see test_fastpath_is_built)")
    native = fastpath.native() if request.param == "native" else None
    monkeypatch.setattr(fastpath, "_native", native)
    yield request.param
