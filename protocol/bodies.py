"""The typed bodies of device reports, and the field checks they share with the envelope.

One frozen dataclass per report body (:class:`StateBody`, :class:`HeartbeatBody`,
:class:`UpdateBody`, and the values inside them). Each checks its fields when it is built, so a
device cannot build a report the fleet would refuse, and reads itself back from its JSON object
form with ``from_dict`` (exactly the documented fields: a missing or unknown one is an error).
The drift body is :class:`protocol.drift.DriftSummary`, which lives with the drift format.

Pure: values in, values out, :class:`~protocol.errors.MessageError` for anything wrong. The
envelope, encoding and parsing of whole messages are :mod:`protocol.messages`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.errors import MessageError

MAX_SEQ = 2**63 - 1
MAX_NAME = 128
MAX_REASON = 2000
MAX_TIMINGS = 32
RUNTIMES = ("onnxruntime", "litert")
SLOTS = ("a", "b")
# the update state machine's states (DESIGN.md, "The update state machine")
UPDATE_STATES = (
    "idle",
    "downloading",
    "verifying",
    "installing",
    "health_check",
    "shadow",  # optional: the candidate runs beside the active model before activating
    "activating",
    "trial",
    "committed",
    "rolling_back",
    "rolled_back",
    "failed",
)


class WireBody(Protocol):
    """What every body offers: its JSON object form (``from_dict`` reads it back)."""

    def to_dict(self) -> dict[str, Any]: ...


# --- field checks (shared by constructors and parsing) --------------------------------------


def need_int(where: str, name: str, value: Any, lo: int = 0, hi: int = MAX_SEQ) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"{where}.{name} must be an integer, got {kind_name(value)}")
    if not lo <= value <= hi:
        raise MessageError(f"{where}.{name} must be between {lo} and {hi}, got {value}")
    return value


def need_float(where: str, name: str, value: Any, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"{where}.{name} must be a number, got {kind_name(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise MessageError(f"{where}.{name} is too large") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise MessageError(f"{where}.{name} must be a finite number in [{lo}, {hi}], got {value}")
    return number


def need_str(where: str, name: str, value: Any, max_len: int = MAX_NAME, text: bool = False) -> str:
    if not isinstance(value, str):
        raise MessageError(f"{where}.{name} must be a string, got {kind_name(value)}")
    if not 1 <= len(value) <= max_len:
        raise MessageError(f"{where}.{name} must be 1 to {max_len} characters long")
    # printable only (no control characters, no lone surrogates that cannot be stored as
    # UTF-8); free text may also hold newlines and tabs
    if not (value.replace("\n", " ").replace("\t", " ") if text else value).isprintable():
        raise MessageError(f"{where}.{name} holds control or unencodable characters")
    return value


def need_bool(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise MessageError(f"{where}.{name} must be true or false, got {kind_name(value)}")
    return value


def need_choice(where: str, name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed or not isinstance(value, str):
        raise MessageError(f"{where}.{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def kind_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def need_fields(where: str, doc: Any, required: tuple[str, ...]) -> dict[str, Any]:
    """``doc`` as a dict with exactly the ``required`` keys."""
    if not isinstance(doc, dict):
        raise MessageError(f"{where} must be a JSON object, got {kind_name(doc)}")
    missing = [k for k in required if k not in doc]
    unknown = sorted(str(k)[:64] for k in doc if k not in required)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(unknown[:10])}")
        raise MessageError(f"{where}: {'; '.join(parts)} (expected {', '.join(required)})")
    return doc


def set_field(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


# --- bodies -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model release: its name and its (only growing) integer version."""

    name: str
    version: int

    def __post_init__(self) -> None:
        need_str("model", "name", self.name)
        need_int("model", "version", self.version)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, doc: Any, where: str = "model") -> ModelRef:
        d = need_fields(where, doc, ("name", "version"))
        return cls(d["name"], d["version"])


@dataclass(frozen=True)
class ActiveModel:
    """The model a device is serving: release, A/B slot, and the runtime running it."""

    name: str
    version: int
    slot: str
    runtime: str

    def __post_init__(self) -> None:
        need_str("model", "name", self.name)
        need_int("model", "version", self.version)
        need_choice("model", "slot", self.slot, SLOTS)
        need_choice("model", "runtime", self.runtime, RUNTIMES)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "slot": self.slot,
            "runtime": self.runtime,
        }

    @classmethod
    def from_dict(cls, doc: Any) -> ActiveModel:
        d = need_fields("model", doc, ("name", "version", "slot", "runtime"))
        return cls(d["name"], d["version"], d["slot"], d["runtime"])


@dataclass(frozen=True)
class StateBody:
    """Birth (``online``) or death (``online`` false, the Last Will) of a device."""

    online: bool
    agent_version: str
    profile: str
    model: ActiveModel | None = None

    def __post_init__(self) -> None:
        need_bool("state", "online", self.online)
        need_str("state", "agent_version", self.agent_version, 64)
        need_str("state", "profile", self.profile, 64)
        if self.model is not None and not isinstance(self.model, ActiveModel):
            raise MessageError("state.model must be an ActiveModel or null")

    def to_dict(self) -> dict[str, Any]:
        return {
            "online": self.online,
            "agent_version": self.agent_version,
            "profile": self.profile,
            "model": None if self.model is None else self.model.to_dict(),
        }

    @classmethod
    def from_dict(cls, doc: Any) -> StateBody:
        d = need_fields("state", doc, ("online", "agent_version", "profile", "model"))
        model = None if d["model"] is None else ActiveModel.from_dict(d["model"])
        return cls(d["online"], d["agent_version"], d["profile"], model)


@dataclass(frozen=True)
class Latency:
    """Inference latency quantiles in milliseconds (``p50 <= p95 <= p99``)."""

    p50: float
    p95: float
    p99: float

    def __post_init__(self) -> None:
        for name in ("p50", "p95", "p99"):
            set_field(self, name, need_float("heartbeat.latency_ms", name, getattr(self, name)))
        if not self.p50 <= self.p95 <= self.p99:
            raise MessageError("heartbeat.latency_ms must have p50 <= p95 <= p99")

    def to_dict(self) -> dict[str, Any]:
        return {"p50": self.p50, "p95": self.p95, "p99": self.p99}

    @classmethod
    def from_dict(cls, doc: Any) -> Latency:
        d = need_fields("heartbeat.latency_ms", doc, ("p50", "p95", "p99"))
        return cls(d["p50"], d["p95"], d["p99"])


_HEARTBEAT_COUNTS = (
    "mem_rss_bytes",
    "mem_available_bytes",
    "disk_free_bytes",
    "outbox_depth",
    "outbox_evicted_total",
    "inferences_total",
    "inference_errors_total",
)


@dataclass(frozen=True)
class HeartbeatBody:
    """A device's vital signs. ``latency_ms`` is None before the first inference; ``model`` is
    None while no model is active. Counters (``*_total``) only grow while the agent runs."""

    uptime_s: float
    cpu_percent: float
    mem_rss_bytes: int
    mem_available_bytes: int
    disk_free_bytes: int
    outbox_depth: int
    outbox_evicted_total: int
    inferences_total: int
    inference_errors_total: int
    latency_ms: Latency | None = None
    model: ModelRef | None = None

    def __post_init__(self) -> None:
        set_field(self, "uptime_s", need_float("heartbeat", "uptime_s", self.uptime_s))
        # per-process CPU can exceed 100 on a multi-core device
        set_field(
            self, "cpu_percent", need_float("heartbeat", "cpu_percent", self.cpu_percent, 0, 1e5)
        )
        for name in _HEARTBEAT_COUNTS:
            need_int("heartbeat", name, getattr(self, name))
        if self.latency_ms is not None and not isinstance(self.latency_ms, Latency):
            raise MessageError("heartbeat.latency_ms must be a Latency or null")
        if self.model is not None and not isinstance(self.model, ModelRef):
            raise MessageError("heartbeat.model must be a ModelRef or null")

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "uptime_s": self.uptime_s,
            "cpu_percent": self.cpu_percent,
        }
        doc.update((name, getattr(self, name)) for name in _HEARTBEAT_COUNTS)
        doc["latency_ms"] = None if self.latency_ms is None else self.latency_ms.to_dict()
        doc["model"] = None if self.model is None else self.model.to_dict()
        return doc

    @classmethod
    def from_dict(cls, doc: Any) -> HeartbeatBody:
        names = ("uptime_s", "cpu_percent", *_HEARTBEAT_COUNTS, "latency_ms", "model")
        d = need_fields("heartbeat", doc, names)
        latency = None if d["latency_ms"] is None else Latency.from_dict(d["latency_ms"])
        model = None if d["model"] is None else ModelRef.from_dict(d["model"], "heartbeat.model")
        return cls(
            **{n: d[n] for n in ("uptime_s", "cpu_percent", *_HEARTBEAT_COUNTS)},
            latency_ms=latency,
            model=model,
        )


@dataclass(frozen=True)
class UpdateBody:
    """One transition of the update state machine for one release.

    ``elapsed_s`` maps a step name (e.g. ``downloading``) to the seconds it took so far in this
    attempt; ``attempt`` counts from 1; ``reason`` says why (required in spirit for ``failed``
    and ``rolling_back``, free text).
    """

    release: ModelRef
    rollback: bool
    from_state: str
    to_state: str
    attempt: int = 1
    reason: str | None = None
    elapsed_s: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.release, ModelRef):
            raise MessageError("update.release must be a ModelRef")
        need_bool("update", "rollback", self.rollback)
        need_choice("update", "from_state", self.from_state, UPDATE_STATES)
        need_choice("update", "to_state", self.to_state, UPDATE_STATES)
        need_int("update", "attempt", self.attempt, 1, 1_000_000)
        if self.reason is not None:
            need_str("update", "reason", self.reason, MAX_REASON, text=True)
        if not isinstance(self.elapsed_s, Mapping):
            raise MessageError(
                f"update.elapsed_s must be an object, got {kind_name(self.elapsed_s)}"
            )
        if len(self.elapsed_s) > MAX_TIMINGS:
            raise MessageError(f"update.elapsed_s holds more than {MAX_TIMINGS} timings")
        timings = {
            need_str("update.elapsed_s", "key", k, 64): need_float(
                "update.elapsed_s", str(k)[:64], v
            )
            for k, v in self.elapsed_s.items()
        }
        set_field(self, "elapsed_s", timings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "release": self.release.to_dict(),
            "rollback": self.rollback,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "attempt": self.attempt,
            "reason": self.reason,
            "elapsed_s": dict(self.elapsed_s),
        }

    @classmethod
    def from_dict(cls, doc: Any) -> UpdateBody:
        names = ("release", "rollback", "from_state", "to_state", "attempt", "reason", "elapsed_s")
        d = need_fields("update", doc, names)
        return cls(
            release=ModelRef.from_dict(d["release"], "update.release"),
            rollback=d["rollback"],
            from_state=d["from_state"],
            to_state=d["to_state"],
            attempt=d["attempt"],
            reason=d["reason"],
            elapsed_s=d["elapsed_s"],
        )
