"""Firmware profiles: the shipped files, schema errors naming file and field, the loader's
errors, picking the profile for a machine and the artifact for a profile."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from firmware_profiles import PROFILE_DIR, load_profile, load_profiles
from protocol.bundle import ArtifactInfo
from protocol.errors import ProfileError
from protocol.profiles import (
    ARCHES,
    FirmwareProfile,
    MachineFacts,
    parse_profile,
    select_artifact,
    select_profile,
)

GOOD = """\
name = "test-board"
description = "a test board"
arch = "aarch64"
cores = 4
ram_mb = 1024
storage_mb = 4096
runtimes = ["litert"]
preferred_format = "tflite"
preferred_quantization = "int8"
inference_threads = 2
latency_budget_ms = 20
max_model_bytes = 1048576
"""
FIELDS = list(tomllib.loads(GOOD))


def _toml(doc: dict[str, object]) -> bytes:
    """A minimal TOML writer for flat documents of strings, numbers and lists."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    return "".join(f"{k} = {value(v)}\n" for k, v in doc.items()).encode()


def _with(**changes: object) -> bytes:
    doc: dict[str, object] = {**tomllib.loads(GOOD), **changes}
    return _toml({k: v for k, v in doc.items() if v is not None})


# --- the shipped profiles --------------------------------------------------------------------


def test_shipped_profiles_cover_the_four_device_classes() -> None:
    profiles = load_profiles()
    by_name = {name: (p.arch, p.runtimes) for name, p in profiles.items()}
    assert by_name == {
        "jetson-aarch64": ("aarch64", ("onnxruntime", "litert")),
        "rpi3-armv7l": ("armv7l", ("litert",)),
        "rpi4-aarch64": ("aarch64", ("litert", "onnxruntime")),
        "x86_64-gateway": ("x86_64", ("onnxruntime", "litert")),
    }
    for path in PROFILE_DIR.glob("*.toml"):
        assert profiles[path.stem] == parse_profile(path.name, path.read_bytes())


def test_load_profile_by_name_and_unknown_name_lists_known_ones() -> None:
    assert load_profile("rpi3-armv7l").runtimes == ("litert",)
    with pytest.raises(ProfileError, match=r"no profile named 'rpi5'.*rpi3-armv7l, rpi4-aarch64"):
        load_profile("rpi5")


def test_good_profile_parses_with_lower_cased_board_markers() -> None:
    p = parse_profile("b.toml", _with(board_markers=["NVIDIA", "Jetson"]))
    assert p == FirmwareProfile(
        name="test-board",
        description="a test board",
        arch="aarch64",
        cores=4,
        ram_mb=1024,
        storage_mb=4096,
        runtimes=("litert",),
        preferred_format="tflite",
        preferred_quantization="int8",
        inference_threads=2,
        latency_budget_ms=20.0,
        max_model_bytes=1048576,
        board_markers=("nvidia", "jetson"),
    )


# --- schema errors name the file and the field -----------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
def test_missing_field_is_named(field: str) -> None:
    doc = tomllib.loads(GOOD)
    del doc[field]
    with pytest.raises(ProfileError, match=rf"^board\.toml: missing required field '{field}'"):
        parse_profile("board.toml", _toml(doc))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cores", "4", r"field 'cores' is str '4', expected int"),
        ("cores", True, r"field 'cores' is bool True"),
        ("ram_mb", 1.5, r"field 'ram_mb' is float 1.5, expected int"),
        ("runtimes", "litert", r"field 'runtimes' is str"),
        ("latency_budget_ms", "fast", r"field 'latency_budget_ms' is str 'fast', expected number"),
        ("name", 7, r"field 'name' is int 7, expected str"),
        ("cores", 0, r"field 'cores' must be positive, got 0"),
        ("max_model_bytes", -1, r"field 'max_model_bytes' must be positive"),
        ("latency_budget_ms", 0, r"field 'latency_budget_ms' must be positive"),
        ("arch", "riscv64", r"field 'arch' is 'riscv64'; use one of x86_64, aarch64, armv7l"),
        ("runtimes", ["tensorrt"], r"field 'runtimes' is 'tensorrt'; use one of"),
        ("runtimes", [], r"field 'runtimes' is empty"),
        ("preferred_format", "pt", r"field 'preferred_format' is 'pt'"),
        ("preferred_quantization", "int4", r"field 'preferred_quantization' is 'int4'"),
        ("inference_threads", 8, r"field 'inference_threads' is 8 but the device has 4 cores"),
        ("board_markers", "pi", r"field 'board_markers' must be a list of strings"),
        ("board_markers", [1], r"field 'board_markers' must be a list of strings"),
        ("colour", "red", r"unknown field\(s\) colour; remove them"),
    ],
)
def test_bad_field_is_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ProfileError, match=r"^board\.toml: " + message):
        parse_profile("board.toml", _with(**{field: value}))


@pytest.mark.parametrize(
    "data",
    [b"name = \n", b"cores = 4\ncores = 5\n", b"\xff\xfe not utf-8", GOOD.encode()[:-40]],
    ids=["syntax", "duplicate-key", "not-utf8", "truncated"],
)
def test_unreadable_toml_names_the_file(data: bytes) -> None:
    with pytest.raises(ProfileError, match=r"^board\.toml: "):
        parse_profile("board.toml", data)


# --- the loader's errors name the files ------------------------------------------------------


def test_loader_names_the_bad_file(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_bytes(_with(name="a"))
    (tmp_path / "b.toml").write_bytes(_with(name="b", cores="many"))
    with pytest.raises(ProfileError, match=rf"^{tmp_path / 'b.toml'}: field 'cores'"):
        load_profiles(tmp_path)


def test_duplicate_names_name_both_files(tmp_path: Path) -> None:
    (tmp_path / "one.toml").write_bytes(_with(name="same"))
    (tmp_path / "two.toml").write_bytes(_with(name="same"))
    with pytest.raises(ProfileError) as err:
        load_profiles(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'one.toml'} and {tmp_path / 'two.toml'} both define profile 'same'; "
        "give each device class its own name"
    )


def test_empty_and_missing_directories(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a profile")
    with pytest.raises(ProfileError, match=r"holds no \*\.toml profile files"):
        load_profiles(tmp_path)
    with pytest.raises(ProfileError, match=r"no such profile directory"):
        load_profiles(tmp_path / "missing")


def test_loader_returns_profiles_sorted_by_name(tmp_path: Path) -> None:
    for name in ("zeta", "alpha", "mid"):
        (tmp_path / f"{name}.toml").write_bytes(_with(name=name))
    assert list(load_profiles(tmp_path)) == ["alpha", "mid", "zeta"]
    with pytest.raises(ProfileError, match=r"no profile named 'x' in .*known profiles: alpha"):
        load_profile("x", tmp_path)


# --- picking the profile for a machine -------------------------------------------------------

GIB = 1024


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        # Pi 4 with 4 GiB: MemTotal reports a bit less than the chip.
        (MachineFacts("aarch64", 4, 3794, "raspberry pi 4 model b rev 1.4"), "rpi4-aarch64"),
        # Pi 4 with 2 GiB reports ~1.8 GiB: below the profile's 2048, still the Pi 4 class.
        (MachineFacts("aarch64", 4, 1848, "raspberry pi 4 model b rev 1.2"), "rpi4-aarch64"),
        # Pi 4 with 8 GiB is still a Pi, not a Jetson: the board decides, not the RAM.
        (MachineFacts("aarch64", 4, 7810, "raspberry pi 4 model b rev 1.5"), "rpi4-aarch64"),
        # A generic aarch64 server without a board file.
        (MachineFacts("aarch64", 64, 256 * GIB), "rpi4-aarch64"),
        (MachineFacts("armv7l", 4, 921, "raspberry pi 3 model b plus rev 1.3"), "rpi3-armv7l"),
        (MachineFacts("armv7l", 4, 427, "raspberry pi zero 2 w rev 1.0"), "rpi3-armv7l"),
        (
            MachineFacts("aarch64", 6, 7620, "nvidia jetson orin nano developer kit"),
            "jetson-aarch64",
        ),
        # Only the Tegra release file, no device-tree model (agent.machine labels its text).
        (
            MachineFacts("aarch64", 4, 3956, "nv_tegra_release: # r32 (release), board: t210ref"),
            "jetson-aarch64",
        ),
        (MachineFacts("x86_64", 2, 24105), "x86_64-gateway"),
        (MachineFacts("x86_64", 16, 64 * GIB), "x86_64-gateway"),
    ],
    ids=[
        "pi4-4g",
        "pi4-2g",
        "pi4-8g",
        "arm-server",
        "pi3",
        "zero2w",
        "jetson-orin",
        "tegra-release",
        "x86-small",
        "x86-big",
    ],
)
def test_select_profile_for_each_device_class(facts: MachineFacts, expected: str) -> None:
    assert select_profile(load_profiles().values(), facts).name == expected


@pytest.mark.parametrize("arch", ["riscv64", "armv6l", "i686", "ppc64le"])
def test_unknown_arch_is_a_clear_error(arch: str) -> None:
    assert arch not in ARCHES
    with pytest.raises(ProfileError, match=rf"no firmware profile for arch '{arch}'.*--profile"):
        select_profile(load_profiles().values(), MachineFacts(arch, 4, 4096))


def test_largest_fitting_profile_wins_and_smallest_is_the_fallback() -> None:
    base = parse_profile("p.toml", GOOD.encode())
    small = dataclasses.replace(base, name="small", ram_mb=512, cores=2, inference_threads=1)
    big = dataclasses.replace(base, name="big", ram_mb=4096, cores=4)
    profiles = [small, big]
    assert select_profile(profiles, MachineFacts("aarch64", 4, 8192)).name == "big"
    assert select_profile(profiles, MachineFacts("aarch64", 4, 1024)).name == "small"
    assert select_profile(profiles, MachineFacts("aarch64", 2, 8192)).name == "small"
    assert select_profile(profiles, MachineFacts("aarch64", 1, 256)).name == "small"


# --- picking the artifact for a profile ------------------------------------------------------


def _artifact(file: str, quant: str, length: int, profiles: tuple[str, ...] = ()) -> ArtifactInfo:
    fmt = file.rsplit(".", 1)[1]
    return ArtifactInfo(
        file=file,
        format=fmt,
        runtime="onnxruntime" if fmt == "onnx" else "litert",
        quantization=quant,
        golden=f"golden/{file}.json",
        sha256="0" * 64,
        length=length,
        profiles=profiles,
    )


RELEASE = [
    _artifact("model.fp32.onnx", "fp32", 400_000),
    _artifact("model.int8.onnx", "int8", 120_000),
    _artifact("model.int8.tflite", "int8", 110_000),
]


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("x86_64-gateway", "model.int8.onnx"),
        ("jetson-aarch64", "model.int8.onnx"),
        ("rpi4-aarch64", "model.int8.tflite"),
        ("rpi3-armv7l", "model.int8.tflite"),
    ],
)
def test_select_artifact_prefers_format_then_quantization(profile: str, expected: str) -> None:
    assert select_artifact(load_profile(profile), RELEASE).file == expected


def test_select_artifact_falls_back_when_the_preferred_one_does_not_fit() -> None:
    onnx_only = [a for a in RELEASE if a.format == "onnx"]
    assert select_artifact(load_profile("rpi4-aarch64"), onnx_only).file == "model.int8.onnx"
    gateway = dataclasses.replace(load_profile("x86_64-gateway"), max_model_bytes=115_000)
    assert select_artifact(gateway, RELEASE).file == "model.int8.tflite"
    fp32_only = dataclasses.replace(load_profile("x86_64-gateway"), preferred_quantization="fp32")
    assert select_artifact(fp32_only, RELEASE).file == "model.fp32.onnx"


def test_select_artifact_respects_the_artifacts_profile_list() -> None:
    pinned = [_artifact("a.int8.onnx", "int8", 10, ("jetson-aarch64",)), *RELEASE[2:]]
    assert select_artifact(load_profile("jetson-aarch64"), pinned).file == "a.int8.onnx"
    assert select_artifact(load_profile("x86_64-gateway"), pinned).file == "model.int8.tflite"


def test_no_fitting_artifact_says_why_for_each() -> None:
    onnx_only = [a for a in RELEASE if a.format == "onnx"]
    with pytest.raises(ProfileError) as err:
        select_artifact(load_profile("rpi3-armv7l"), onnx_only)
    message = str(err.value)
    assert "no artifact of this release fits profile 'rpi3-armv7l'" in message
    assert "model.fp32.onnx: runtime onnxruntime not on rpi3-armv7l" in message
    assert "model.int8.onnx: runtime onnxruntime not on rpi3-armv7l" in message
    tiny = dataclasses.replace(load_profile("rpi3-armv7l"), max_model_bytes=100)
    with pytest.raises(ProfileError, match=r"model.int8.tflite: 110000 bytes > max 100"):
        select_artifact(tiny, RELEASE)
    other = [_artifact("model.int8.tflite", "int8", 10, ("rpi4-aarch64",))]
    with pytest.raises(ProfileError, match=r"not built for profile rpi3-armv7l"):
        select_artifact(load_profile("rpi3-armv7l"), other)


# --- fleet profiles list ----------------------------------------------------------------------


def test_fleet_profiles_list(capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.cli import main

    assert main(["profiles", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "name", "arch", "cores", "ram", "MiB", "runtimes", "preferred", "threads", "budget", "ms",
        "max", "model",
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == list(load_profiles())
    assert lines[2].split() == [
        "rpi3-armv7l", "armv7l", "4", "512", "litert", "tflite", "int8", "1", "50", "4", "MiB",
    ]  # fmt: skip
    assert main(["profiles", "list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == [json.loads(json.dumps(dataclasses.asdict(p))) for p in load_profiles().values()]


def test_fleet_profiles_list_names_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleet.cli import main

    (tmp_path / "x.toml").write_bytes(_with(preferred_format="savedmodel"))
    assert main(["profiles", "list", "--dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"fleet: error: {tmp_path / 'x.toml'}: field 'preferred_format' is 'savedmodel'"
    )
