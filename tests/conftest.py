"""Shared fixtures: a real Mosquitto per test (or per module), on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A fresh broker with its own config and persistence directory."""
    with MosquittoBroker(tmp_path / "mosquitto") as b:
        yield b


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b
