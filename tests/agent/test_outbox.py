"""The telemetry outbox: durable, ordered, bounded, and its sequence numbers never repeat."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.errors import OutboxError
from agent.outbox import Outbox
from protocol.errors import MessageError
from protocol.messages import HeartbeatBody, StateBody, parse_message
from protocol.topics import TopicKind, heartbeat_topic

DEVICE = "dev-1"
REPO = Path(__file__).resolve().parents[2]


def beat(n: int = 0) -> HeartbeatBody:
    return HeartbeatBody(float(n), 1.0, 1, 2, 3, 0, 0, n, 0)


def put(box: Outbox, n: int = 0, now: float | None = None) -> int:
    return box.put(TopicKind.HEARTBEAT, beat(n), now)


def test_rows_come_out_oldest_first_and_ack_deletes(tmp_path: Path) -> None:
    with Outbox(tmp_path / "a.db", DEVICE) as box:
        seqs = [put(box, i, now=100.0 + i) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        assert [r.seq for r in box.peek(3)] == [1, 2, 3]
        assert [r.seq for r in box.peek(10, after=3)] == [4, 5]
        assert box.ack(2) and not box.ack(2)
        assert box.ack_many([1, 3, 99]) == 2
        assert [r.seq for r in box.peek(10)] == [4, 5]
        assert box.depth() == 2
        assert box.oldest_age(now=110.0) == pytest.approx(7.0)
        box.ack_many([4, 5])
        assert box.depth() == 0 and box.oldest_age(now=110.0) is None
        assert box.stats().bytes == 0


def test_a_row_is_the_publishable_envelope(tmp_path: Path) -> None:
    with Outbox(tmp_path / "a.db", DEVICE) as box:
        seq = put(box, 7, now=1718000000.5)
        (row,) = box.peek(1)
    assert row.topic == heartbeat_topic(DEVICE)
    env = parse_message(row.topic, row.payload)
    assert (env.device, env.seq, env.ts, env.body) == (DEVICE, seq, 1718000000.5, beat(7))
    assert row.created == 1718000000.5


def test_seq_survives_restarts_and_never_repeats_after_the_outbox_empties(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    with Outbox(db, DEVICE) as box:
        box.ack_many([put(box) for _ in range(3)])
        assert box.reserve(8) == 4  # the link's birth/will block
        assert box.depth() == 0
    with Outbox(db, DEVICE) as box:
        assert put(box) == 12
        assert box.stats().last_seq == 12


def test_bound_on_rows_evicts_oldest_first_and_counts_persistently(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    with Outbox(db, DEVICE, max_rows=5) as box:
        for i in range(8):
            put(box, i)
        assert [r.seq for r in box.peek(10)] == [4, 5, 6, 7, 8]
        assert box.evicted_total() == 3
        assert box.ack(1) is False  # acknowledged after eviction: nothing to delete
    with Outbox(db, DEVICE, max_rows=5) as box:
        assert box.evicted_total() == 3 and box.depth() == 5
        put(box)
        assert box.evicted_total() == 4
        assert [r.seq for r in box.peek(10)] == [5, 6, 7, 8, 9]


def test_bound_on_bytes_evicts_oldest_first(tmp_path: Path) -> None:
    with Outbox(tmp_path / "a.db", DEVICE, max_bytes=1000, max_payload_bytes=1000) as box:
        for i in range(10):
            put(box, i)
        size = len(box.peek(1)[0].payload)
        stats = box.stats()
        assert stats.depth == 1000 // size
        assert stats.bytes <= 1000
        assert [r.seq for r in box.peek(100)] == list(range(11 - stats.depth, 11))
        assert stats.evicted_total == 10 - stats.depth


def test_too_large_report_is_refused_and_takes_no_seq(tmp_path: Path) -> None:
    with Outbox(tmp_path / "a.db", DEVICE, max_payload_bytes=100) as box:
        with pytest.raises(OutboxError, match="exceeds the 100-byte message limit"):
            put(box)
        with pytest.raises(MessageError, match="carries a HeartbeatBody"):
            box.put(TopicKind.HEARTBEAT, StateBody(True, "1", "p"))
        assert box.depth() == 0 and box.stats().last_seq == 0


def test_outbox_of_another_device_is_refused(tmp_path: Path) -> None:
    Outbox(tmp_path / "a.db", DEVICE).close()
    with pytest.raises(OutboxError, match="belongs to device 'dev-1'"):
        Outbox(tmp_path / "a.db", "dev-2")


def test_bad_bounds_and_unopenable_file_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="max_rows >= 1"):
        Outbox(tmp_path / "a.db", DEVICE, max_rows=0)
    with pytest.raises(OutboxError, match="directory exists"):
        Outbox(tmp_path / "missing" / "a.db", DEVICE)


def test_concurrent_puts_get_unique_consecutive_seqs(tmp_path: Path) -> None:
    with Outbox(tmp_path / "a.db", DEVICE) as box:
        got: list[int] = []
        lock = threading.Lock()

        def work() -> None:
            mine = [put(box) for _ in range(40)]
            with lock:
                got.extend(mine)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == list(range(1, 161))
        assert [r.seq for r in box.peek(1000)] == list(range(1, 161))


_KILLED_WRITER = """
import sys
from agent.outbox import Outbox
from protocol.messages import HeartbeatBody
from protocol.topics import TopicKind
box = Outbox(sys.argv[1], "dev-1")
while True:
    seq = box.put(TopicKind.HEARTBEAT, HeartbeatBody(1.0, 1.0, 1, 2, 3, 0, 0, 0, 0))
    print(seq, flush=True)
"""


def test_every_put_that_returned_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(db)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.strip() == b"1", first
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    out = first + proc.stdout.read()
    proc.wait()
    printed = [int(line) for line in out.split()]
    assert len(printed) > 10
    with Outbox(db, DEVICE) as box:
        stored = [r.seq for r in box.peek(10**6)]
        assert stored[: len(printed)] == printed  # nothing returned was lost
        assert put(box) == stored[-1] + 1  # and the counter goes on


class OutboxModel(RuleBasedStateMachine):
    """Random puts, acks and reopenings against a plain list of what should be stored."""

    MAX_ROWS = 6

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.db = Path(self.dir) / "a.db"
        self.box = Outbox(self.db, DEVICE, max_rows=self.MAX_ROWS)
        self.rows: list[int] = []
        self.last = 0
        self.evicted = 0

    @rule()
    def put(self) -> None:
        self.last += 1
        assert put(self.box) == self.last
        self.rows.append(self.last)
        if len(self.rows) > self.MAX_ROWS:
            self.rows.pop(0)
            self.evicted += 1

    @rule(n=st.integers(1, 9))
    def reserve(self, n: int) -> None:
        assert self.box.reserve(n) == self.last + 1
        self.last += n

    @precondition(lambda self: bool(self.rows))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.rows))
        assert self.box.ack(seq)
        self.rows.remove(seq)

    @rule()
    def reopen(self) -> None:
        self.box.close()
        self.box = Outbox(self.db, DEVICE, max_rows=self.MAX_ROWS)

    @invariant()
    def matches(self) -> None:
        assert [r.seq for r in self.box.peek(100)] == self.rows
        stats = self.box.stats()
        assert (stats.depth, stats.evicted_total, stats.last_seq) == (
            len(self.rows),
            self.evicted,
            self.last,
        )

    def teardown(self) -> None:
        self.box.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestOutboxModel = OutboxModel.TestCase
TestOutboxModel.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
