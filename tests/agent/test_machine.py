"""Probing the machine: real reads on this host, and board trees of other device classes
written to disk and read through the same code, then handed to the profile selection."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import psutil
import pytest

from agent.machine import normalise_arch, probe
from firmware_profiles import load_profiles
from protocol.errors import ProfileError
from protocol.profiles import MachineFacts, select_profile


def test_probe_reads_this_machine() -> None:
    facts = probe()
    assert facts.arch == normalise_arch(platform.machine())
    assert facts.cores == os.cpu_count()
    # psutil reads the same kernel figure through its own parser: an independent oracle.
    assert facts.ram_mb == psutil.virtual_memory().total // (1024 * 1024)
    assert facts.ram_mb > 0
    board_files = [
        p for p in ("/proc/device-tree/model", "/etc/nv_tegra_release") if Path(p).exists()
    ]
    assert (facts.board == "") == (not board_files)


def test_this_machine_gets_a_profile_of_its_arch() -> None:
    facts = probe()
    if facts.arch not in {p.arch for p in load_profiles().values()}:
        pytest.skip(f"no shipped profile for this host's arch {facts.arch}")
    assert select_profile(load_profiles().values(), facts).arch == facts.arch


@pytest.mark.parametrize(
    ("machine", "bits", "arch"),
    [
        ("x86_64", 64, "x86_64"),
        ("AMD64", 64, "x86_64"),
        ("arm64", 64, "aarch64"),
        ("aarch64", 64, "aarch64"),
        ("aarch64", 32, "armv7l"),  # 32-bit Raspberry Pi OS on a 64-bit kernel
        ("armv7l", 32, "armv7l"),
        ("armv7hl", 32, "armv7l"),
        ("armv8l", 32, "armv7l"),
        ("armv6l", 32, "armv6l"),  # Pi Zero / Pi 1: no profile, kept as is
        ("riscv64", 64, "riscv64"),
        (" X86_64\n", 64, "x86_64"),
    ],
)
def test_normalise_arch(machine: str, bits: int, arch: str) -> None:
    assert normalise_arch(machine, bits) == arch


def _tree(root: Path, mem_kb: int | None, model: bytes | None, tegra: bytes | None) -> Path:
    """A root directory laid out like a device's /proc and /etc."""
    if mem_kb is not None:
        (root / "proc").mkdir(parents=True, exist_ok=True)
        (root / "proc/meminfo").write_text(
            f"MemTotal:       {mem_kb} kB\nMemFree:         123456 kB\n"
        )
    if model is not None:
        (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
        (root / "proc/device-tree/model").write_bytes(model)
    if tegra is not None:
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc/nv_tegra_release").write_bytes(tegra)
    return root


TEGRA = b"# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n"


@pytest.mark.parametrize(
    ("machine", "mem_kb", "model", "tegra", "board", "profile"),
    [
        (
            "aarch64",
            3884640,
            b"Raspberry Pi 4 Model B Rev 1.4\x00",
            None,
            "raspberry pi 4 model b rev 1.4",
            "rpi4-aarch64",
        ),
        (
            "armv7l",
            943544,
            b"Raspberry Pi 3 Model B Plus Rev 1.3\x00",
            None,
            "raspberry pi 3 model b plus rev 1.3",
            "rpi3-armv7l",
        ),
        (
            "armv7l",
            437256,
            b"Raspberry Pi Zero 2 W Rev 1.0\x00",
            None,
            "raspberry pi zero 2 w rev 1.0",
            "rpi3-armv7l",
        ),
        (
            "aarch64",
            7802820,
            b"NVIDIA Jetson Orin Nano Developer Kit\x00",
            TEGRA,
            "nvidia jetson orin nano developer kit nv_tegra_release: # r35 (release), revision: "
            "4.1, gcid: 33958178, board: t186ref, eabi: aarch64",
            "jetson-aarch64",
        ),
        (
            "aarch64",
            4051048,
            None,
            TEGRA,
            "nv_tegra_release: # r35 (release), revision: 4.1, gcid: 33958178, board: t186ref, "
            "eabi: aarch64",
            "jetson-aarch64",
        ),
        ("x86_64", 8039424, None, None, "", "x86_64-gateway"),
    ],
    ids=["pi4-4g", "pi3", "zero2w", "jetson", "jetson-release-only", "x86"],
)
def test_probe_device_trees(
    tmp_path: Path,
    machine: str,
    mem_kb: int,
    model: bytes | None,
    tegra: bytes | None,
    board: str,
    profile: str,
) -> None:
    facts = probe(_tree(tmp_path, mem_kb, model, tegra), machine)
    assert facts == MachineFacts(machine, os.cpu_count() or 1, mem_kb // 1024, board)
    assert select_profile(load_profiles().values(), facts).name == profile


def test_probe_without_proc_files_reports_unknowns(tmp_path: Path) -> None:
    facts = probe(tmp_path, "aarch64")
    assert (facts.ram_mb, facts.board) == (0, "")
    # Nothing known but the arch: the smallest profile of the arch is the safe choice.
    assert select_profile(load_profiles().values(), facts).name == "rpi4-aarch64"


def test_meminfo_without_memtotal_is_zero(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemFree: 5 kB\nMemTotal: lots\n")
    assert probe(tmp_path, "x86_64").ram_mb == 0


def test_unknown_arch_gets_a_clear_error(tmp_path: Path) -> None:
    facts = probe(_tree(tmp_path, 2048000, b"StarFive VisionFive 2 v1.3B\x00", None), "riscv64")
    assert facts.arch == "riscv64"
    with pytest.raises(ProfileError, match=r"no firmware profile for arch 'riscv64'; pass"):
        select_profile(load_profiles().values(), facts)


# --- edge-agent profile show ------------------------------------------------------------------


def test_profile_show_detects_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    facts = probe()
    expected = select_profile(load_profiles().values(), facts)
    assert main(["profile", "show", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["detected"] is True
    assert MachineFacts(**doc["machine"]) == facts
    assert doc["profile"]["name"] == expected.name
    assert doc["profile"]["runtimes"] == list(expected.runtimes)
    assert main(["profile", "show"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"machine\n  arch         {facts.arch}\n")
    assert f"profile {expected.name} (detected)\n" in out
    assert f"  threads      {expected.inference_threads}\n" in out


def test_profile_show_named_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    assert main(["profile", "show", "--profile", "rpi3-armv7l"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("profile rpi3-armv7l\n  description  Raspberry Pi 3")
    assert "machine" not in out and "  runtimes     litert\n" in out
    assert main(["profile", "show", "--profile", "rpi5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-agent: error: no profile named 'rpi5'")
    assert "jetson-aarch64, rpi3-armv7l, rpi4-aarch64, x86_64-gateway" in err


def test_profile_show_with_a_bad_profile_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    (tmp_path / "broken.toml").write_text('name = "broken"\n')
    assert main(["profile", "show", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"edge-agent: error: {tmp_path / 'broken.toml'}: missing required field 'description'\n"
    )
