"""The agent's version: the installed ``edgefleet`` distribution's, read once."""

from __future__ import annotations

import functools
from importlib import metadata

UNKNOWN = "0+unknown"


@functools.cache
def agent_version() -> str:
    try:
        return metadata.version("edgefleet")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return UNKNOWN
