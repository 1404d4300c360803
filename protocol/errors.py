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


class ReleaseTargetError(ProtocolError):
    """A release's TUF target path or custom metadata does not follow the contract."""


class DesiredDocumentError(ProtocolError):
    """A signed desired document fails verification; ``reason`` says which check failed.

    ``reason`` is one of :class:`protocol.desired.DesiredFailure`'s values (``malformed``,
    ``bad_signature``, ``expired``, ``replayed``, ``wrong_device``, ``bad_root``).
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.detail = message
        super().__init__(f"desired document refused ({reason}): {message}")

    def __reduce__(self) -> tuple[type["DesiredDocumentError"], tuple[str, str]]:
        return (type(self), (self.reason, self.detail))
