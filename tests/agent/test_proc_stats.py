"""The agent's /proc figures against psutil's (an independent reader of the same kernel data),
and their zeros where /proc is missing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from agent.proc_stats import CpuMeter, memory_bytes, rss_bytes


def test_rss_and_memory_match_psutil() -> None:
    ours, theirs = rss_bytes(), psutil.Process().memory_info().rss
    assert abs(ours - theirs) <= 2 * 2**20, (ours, theirs)  # a few pages move between reads
    total, available = memory_bytes()
    vm = psutil.virtual_memory()
    assert total == vm.total
    assert 0 < available <= total
    assert abs(available - vm.available) <= 64 * 2**20


def test_cpu_meter_agrees_with_psutil_busy_and_idle() -> None:
    process = psutil.Process()
    process.cpu_percent(None)
    meter = CpuMeter(min_interval=0.2)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # one core busy (as much as a loaded machine gives it)
        pass
    busy, reference = meter.percent(), process.cpu_percent(None)
    assert busy > 0.0
    assert abs(busy - reference) <= 15.0, (busy, reference)
    assert meter.percent() == busy  # sampled at most once per min_interval
    time.sleep(0.5)
    idle, reference = meter.percent(), process.cpu_percent(None)
    assert idle < busy
    assert abs(idle - reference) <= 15.0, (idle, reference)


def test_no_proc_gives_zeros_not_errors(tmp_path: Path) -> None:
    assert rss_bytes(tmp_path) == 0
    assert memory_bytes(tmp_path) == (0, 0)
    (tmp_path / "meminfo").write_text("garbage\nMemTotal: lots\n")
    assert memory_bytes(tmp_path) == (0, 0)
    assert os.sysconf("SC_PAGE_SIZE") > 0
