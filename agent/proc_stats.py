"""The agent process's and the machine's figures for the heartbeat and ``/health``, read from
Linux's ``/proc`` (the agent runs on Linux devices). Not psutil: importing it costs ~0.7 MiB of
resident memory, and the agent has 64 MiB in all on LiteRT.

Where ``/proc`` is missing (a developer's non-Linux machine) the figures are 0, never an error:
they describe the device, they do not steer it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

PROC = Path("/proc")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(proc: Path = PROC) -> int:
    """This process's resident set size (``/proc/self/statm``'s second field, in pages)."""
    try:
        return int((proc / "self" / "statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def memory_bytes(proc: Path = PROC) -> tuple[int, int]:
    """The machine's ``(total, available)`` memory (``/proc/meminfo``: MemTotal, MemAvailable)."""
    fields: dict[str, int] = {}
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                fields[name] = int(value.split()[0]) * 1024  # kB
    except (OSError, IndexError, ValueError):
        return 0, 0
    return fields.get("MemTotal", 0), fields.get("MemAvailable", 0)


class CpuMeter:
    """This process's CPU use in percent of one core (more than 100 with several threads busy),
    averaged since the previous sample; sampled at most once every ``min_interval`` seconds, so
    a health page refreshed often does not shrink the heartbeat's interval to nothing."""

    def __init__(self, min_interval: float = 1.0) -> None:
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._cpu, self._wall = self._now()
        self._percent = 0.0

    @staticmethod
    def _now() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, time.monotonic()

    def reset(self) -> None:
        """Start measuring from now (the agent's start)."""
        with self._lock:
            self._cpu, self._wall = self._now()
            self._percent = 0.0

    def percent(self) -> float:
        with self._lock:
            cpu, wall = self._now()
            if wall - self._wall >= self.min_interval:
                self._percent = 100.0 * max(0.0, cpu - self._cpu) / (wall - self._wall)
                self._cpu, self._wall = cpu, wall
            return self._percent
