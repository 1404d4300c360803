"""Domain errors of the wire contract, grouped by where they come from.

Each message says what was wrong and what to do about it.
"""


class ProtocolError(ValueError):
    """Base class: some input does not follow the edgefleet contract."""


class ProfileError(ProtocolError):
    """A firmware profile file is missing a field, has a wrong type, or no profile fits."""


class ReferenceProfileError(ProtocolError):
    """A reference profile (drift baseline) is malformed."""


class BundleError(ProtocolError):
    """A model bundle's metadata is malformed or does not match its files."""
