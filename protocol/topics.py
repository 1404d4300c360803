"""MQTT topic names: build them, parse them, and validate device ids.

Every topic lives under the root ``edgefleet/v1``::

    edgefleet/v1/devices/{id}/state                 device -> fleet, QoS 1, retained (+ Last Will)
    edgefleet/v1/devices/{id}/telemetry/heartbeat   device -> fleet, QoS 1
    edgefleet/v1/devices/{id}/telemetry/drift       device -> fleet, QoS 1
    edgefleet/v1/devices/{id}/update                device -> fleet, QoS 1
    edgefleet/v1/devices/{id}/desired               fleet -> device, QoS 1, retained

A device id is 1 to 64 characters of ``[a-z0-9-]``: it never contains the MQTT wildcards ``+``
and ``#`` nor the level separator ``/``, so an id can always be put into a topic and read back
out unambiguously. The fleet reads device reports through MQTT 5 shared subscriptions
(``$share/{group}/...``) so that several workers split the load.

This module is pure string work. It does not parse payloads (that is :mod:`protocol.messages`)
and does not talk to a broker.
"""

from __future__ import annotations

import re
from enum import StrEnum

from protocol.errors import DeviceIdError, TopicError

ROOT = "edgefleet/v1"
DEVICES = f"{ROOT}/devices"
DEVICE_ID_PATTERN = r"[a-z0-9-]{1,64}"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
SHARE_GROUP_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_SHARE_GROUP = re.compile(SHARE_GROUP_PATTERN)


class TopicKind(StrEnum):
    """What a device topic carries; the value is the topic's suffix after the device id."""

    STATE = "state"
    HEARTBEAT = "telemetry/heartbeat"
    DRIFT = "telemetry/drift"
    UPDATE = "update"
    DESIRED = "desired"


# what a device publishes (and the fleet ingests); ``desired`` goes the other way
DEVICE_REPORTS: tuple[TopicKind, ...] = (
    TopicKind.STATE,
    TopicKind.HEARTBEAT,
    TopicKind.DRIFT,
    TopicKind.UPDATE,
)
_BY_SUFFIX = {kind.value: kind for kind in TopicKind}


def is_device_id(value: object) -> bool:
    """True if ``value`` is a string that is a valid device id."""
    return isinstance(value, str) and _DEVICE_ID.fullmatch(value) is not None


def validate_device_id(value: object) -> str:
    """Return ``value`` if it is a valid device id, else raise :class:`DeviceIdError`."""
    if not is_device_id(value):
        raise DeviceIdError(
            f"device id {value!r} is not valid: use 1 to 64 characters of lower-case letters, "
            "digits and '-' (no '/', '+', '#', spaces or upper case)"
        )
    assert isinstance(value, str)
    return value


def device_topic(device_id: str, kind: TopicKind) -> str:
    """The topic of ``kind`` for ``device_id`` (validated)."""
    if kind not in _BY_SUFFIX.values():
        raise TopicError(f"{kind!r} is not a topic kind; use one of {', '.join(_BY_SUFFIX)}")
    return f"{DEVICES}/{validate_device_id(device_id)}/{TopicKind(kind).value}"


def state_topic(device_id: str) -> str:
    return device_topic(device_id, TopicKind.STATE)


def heartbeat_topic(device_id: str) -> str:
    return device_topic(device_id, TopicKind.HEARTBEAT)


def drift_topic(device_id: str) -> str:
    return device_topic(device_id, TopicKind.DRIFT)


def update_topic(device_id: str) -> str:
    return device_topic(device_id, TopicKind.UPDATE)


def desired_topic(device_id: str) -> str:
    return device_topic(device_id, TopicKind.DESIRED)


def parse_topic(topic: str) -> tuple[str, TopicKind]:
    """Split a concrete device topic into ``(device_id, kind)``.

    Raises :class:`TopicError` for anything that is not exactly one of the five device topics
    (other roots, wildcards, bad device ids, unknown suffixes).
    """
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, got {type(topic).__name__}")
    prefix = DEVICES + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic {topic[:200]!r} is not under {prefix!r}")
    device_id, sep, suffix = topic[len(prefix) :].partition("/")
    if not sep or not is_device_id(device_id):
        raise TopicError(f"topic {topic[:200]!r} does not name a valid device id after {prefix!r}")
    kind = _BY_SUFFIX.get(suffix)
    if kind is None:
        raise TopicError(
            f"topic {topic[:200]!r} ends in {suffix[:100]!r}; known device topics end in "
            + ", ".join(k.value for k in TopicKind)
        )
    return device_id, kind


def report_filters() -> tuple[str, ...]:
    """Topic filters that match every device report (state, telemetry, update) of every device."""
    return (
        f"{DEVICES}/+/{TopicKind.STATE.value}",
        f"{DEVICES}/+/telemetry/+",
        f"{DEVICES}/+/{TopicKind.UPDATE.value}",
    )


def shared(topic_filter: str, group: str = "fleet") -> str:
    """The MQTT 5 shared-subscription form ``$share/{group}/{filter}`` of ``topic_filter``."""
    if _SHARE_GROUP.fullmatch(group) is None:
        raise TopicError(
            f"shared-subscription group {group!r} is not valid: use 1 to 64 characters of "
            "letters, digits, '_' and '-'"
        )
    return f"$share/{group}/{topic_filter}"


def fleet_filters(group: str = "fleet") -> tuple[str, ...]:
    """The fleet ingester's shared subscriptions: ``$share/{group}/edgefleet/v1/devices/+/...``."""
    return tuple(shared(f, group) for f in report_filters())
