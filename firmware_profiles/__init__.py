"""The shipped firmware profiles: one TOML file per device class, and their loader.

Parsing, validation and selection live in :mod:`protocol.profiles`; this package locates the
files (so they are found both in a checkout and in an installed wheel), reads them and hands
their bytes over. It does not probe the machine (:mod:`agent.machine`).
"""

from __future__ import annotations

from pathlib import Path

from protocol.errors import ProfileError
from protocol.profiles import FirmwareProfile, parse_profile

PROFILE_DIR = Path(__file__).resolve().parent
SUFFIX = ".toml"


def load_profiles(directory: Path = PROFILE_DIR) -> dict[str, FirmwareProfile]:
    """Every ``*.toml`` profile in ``directory``, by profile name (sorted).

    Raises :class:`ProfileError` naming the file for a bad file, both files for a duplicate
    name, and the directory when it holds no profiles.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ProfileError(f"{directory}: no such profile directory; pass an existing directory")
    files = sorted(directory.glob(f"*{SUFFIX}"))
    if not files:
        raise ProfileError(
            f"{directory}: holds no *{SUFFIX} profile files; add one file per device class"
        )
    profiles: dict[str, FirmwareProfile] = {}
    sources: dict[str, Path] = {}
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ProfileError(f"{path}: cannot be read ({exc.strerror})") from exc
        profile = parse_profile(str(path), data)
        if profile.name in profiles:
            raise ProfileError(
                f"{sources[profile.name]} and {path} both define profile {profile.name!r}; "
                "give each device class its own name"
            )
        profiles[profile.name] = profile
        sources[profile.name] = path
    return dict(sorted(profiles.items()))


def load_profile(name: str, directory: Path = PROFILE_DIR) -> FirmwareProfile:
    """The profile called ``name``; the error lists the known names and where they came from."""
    profiles = load_profiles(directory)
    if name not in profiles:
        raise ProfileError(
            f"no profile named {name!r} in {directory}; known profiles: {', '.join(profiles)}"
        )
    return profiles[name]
