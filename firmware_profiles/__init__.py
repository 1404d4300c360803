"""The shipped firmware profiles: one TOML file per device class.

Parsing, validation and selection live in :mod:`protocol.profiles`; this package only locates
the files so they are found both in a checkout and in an installed wheel.
"""

from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent
