"""The update record in SQLite: saved atomically, counted at start, history, accepted serials."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from agent.update_states import UpdateEvent, UpdateRecord, UpdateState
from agent.update_store import UpdateStore, UpdateStoreError

S, E = UpdateState, UpdateEvent


def record(update_id: int = 1, state: UpdateState = S.DOWNLOADING) -> UpdateRecord:
    return UpdateRecord(
        update_id=update_id,
        model="pdm-classifier",
        version=2,
        rollback=False,
        serial=5,
        target_path="pdm-classifier/2/model.int8.onnx",
        state=state,
        started_at=1.0,
        entered_at=1.0,
    )


def test_empty_store(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "agent.db")
    assert store.load() is None
    assert store.start() is None
    assert store.last_serial() is None
    assert store.next_update_id() == 1
    assert store.history() == []


def test_save_survives_reopen_and_start_counts_attempts(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    store = UpdateStore(path)
    store.save(record().moved(E.DOWNLOADED, 2.0))
    store.close()
    for attempt in (2, 3):
        store = UpdateStore(path)
        r = store.start()
        assert r is not None and r.state is S.VERIFYING and r.attempt == attempt
        store.close()
    assert UpdateStore(path).load() == dataclasses.replace(r, attempt=3)


def test_finished_records_go_to_history_and_are_not_counted(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "agent.db")
    done = record(1).moved(E.FAIL, 3.0, "bad_signature")
    store.save(done)
    assert store.start() == done  # a finished update is not resumed nor counted
    store.save(record(2))
    assert store.next_update_id() == 3
    assert [h.update_id for h in store.history()] == [1]
    assert store.history()[0].reason == "bad_signature"


def test_accept_writes_serial_and_record_together(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "agent.db")
    store.accept(9, "ab" * 32, record())
    assert (store.last_serial(), store.last_desired_sha256()) == (9, "ab" * 32)
    assert store.load() == record()
    store.accept(10, "cd" * 32, None)
    assert store.last_serial() == 10


def test_unwritable_store_says_so(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    store = UpdateStore(path)
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE update_current")
    conn.execute("CREATE TABLE update_current (id INTEGER PRIMARY KEY CHECK (id = 2), record TEXT)")
    conn.commit()
    conn.close()
    store = UpdateStore(path)
    with pytest.raises(UpdateStoreError, match="cannot write the update store"):
        store.save(record())


def test_bad_path(tmp_path: Path) -> None:
    with pytest.raises(UpdateStoreError, match="cannot open"):
        UpdateStore(tmp_path / "missing" / "agent.db")
