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


# --- MQTT topics and device reports (protocol.topics, protocol.messages) ------------------------


class DeviceIdError(ProtocolError):
    """A device id does not match ``[a-z0-9-]{1,64}`` (see :mod:`protocol.topics`)."""


class TopicError(ProtocolError):
    """A string is not one of the edgefleet device topics (see :mod:`protocol.topics`)."""


class MessageError(ProtocolError):
    """A report envelope or body has a missing, unknown or wrongly typed field, or a value out
    of range. Raised when building a report on the device and when parsing one."""


class MessageRejected(ProtocolError):
    """An incoming device message is dropped; ``reason`` is the counter to bump.

    ``reason`` is one of :class:`protocol.messages.RejectReason`'s values: ``oversized``,
    ``malformed`` (not UTF-8 JSON, or not an object), ``schema`` (wrong or missing fields,
    wrong types, unknown envelope version), ``wrong_device`` (the envelope's device is not the
    topic's) or ``unknown_topic``. ``detail`` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"message rejected ({reason}): {detail}")

    def __reduce__(self) -> tuple[type["MessageRejected"], tuple[str, str]]:
        return (type(self), (self.reason, self.detail))


# --- drift summaries (protocol.drift) -----------------------------------------------------------


class DriftError(ProtocolError):
    """A drift summary, or the counts or inputs it is built from, does not follow the contract."""


class DriftIncompatibleError(DriftError):
    """Counts cannot be merged or compared: they were binned with different reference profiles
    (or belong to another model or version). Compare each with its own reference instead."""
