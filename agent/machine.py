"""Probe the running machine for the facts that pick its firmware profile.

:func:`probe` reads the architecture, the core count, ``MemTotal`` from ``/proc/meminfo`` and
the board's own name (``/proc/device-tree/model`` on a Raspberry Pi or Jetson, plus
``/etc/nv_tegra_release`` on a Jetson) and returns them as :class:`protocol.profiles.MachineFacts`.
It is a thin adapter: which profile fits those facts is decided by
:func:`protocol.profiles.select_profile`, not here.
"""

from __future__ import annotations

import os
import platform
import struct
from pathlib import Path

from protocol.profiles import MachineFacts

_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "arm64": "aarch64",
    "armv8l": "armv7l",  # a 32-bit ARM userland on a 64-bit core
}
# Files that name the board; read relative to the probe's root.
DEVICE_TREE_MODEL = "proc/device-tree/model"
TEGRA_RELEASE = "etc/nv_tegra_release"
BOARD_FILES = (DEVICE_TREE_MODEL, TEGRA_RELEASE)
MEMINFO = "proc/meminfo"


def normalise_arch(machine: str, pointer_bits: int = 64) -> str:
    """``platform.machine()`` spelled the way profiles spell it (x86_64, aarch64, armv7l).

    ``pointer_bits`` is the width of this Python: a 32-bit userland on a 64-bit ARM kernel
    (Raspberry Pi OS 32-bit on a Pi 4 reports ``aarch64``) can only run armv7l wheels.
    Unknown architectures are returned lower-cased, unchanged; no profile will match them.
    """
    arch = machine.strip().lower()
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch.startswith("armv7"):  # armv7l, armv7hl, armv7a ...
        arch = "armv7l"
    if arch == "aarch64" and pointer_bits == 32:
        arch = "armv7l"
    return arch


def probe(root: Path = Path("/"), machine: str | None = None) -> MachineFacts:
    """The running machine's facts. ``root`` and ``machine`` let a test read another tree."""
    arch = normalise_arch(
        platform.machine() if machine is None else machine, struct.calcsize("P") * 8
    )
    return MachineFacts(
        arch=arch,
        cores=os.cpu_count() or 1,
        ram_mb=_mem_total_mb(root / MEMINFO),
        board=_board(root),
    )


def _mem_total_mb(meminfo: Path) -> int:
    """``MemTotal`` in MiB; 0 when the file is missing or has no such line."""
    try:
        text = meminfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) // 1024  # the kernel reports kB (KiB)
    return 0


def _board(root: Path) -> str:
    """Lower-cased text of the board files that exist, joined by a space.

    The Tegra release file's text is labelled with the file's name: its content
    ("# R35 (release), REVISION: 4.1, ... BOARD: t186ref") never says "tegra" or "jetson", its
    existence does.
    """
    texts = []
    for name in BOARD_FILES:
        try:
            raw = (root / name).read_bytes()
        except OSError:
            continue
        text = " ".join(raw.replace(b"\x00", b" ").decode("utf-8", errors="replace").split())
        if name == TEGRA_RELEASE:
            text = f"{Path(name).name}: {text}"
        if text:
            texts.append(text.lower())
    return " ".join(texts)
