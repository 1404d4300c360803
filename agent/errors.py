"""Errors of the device agent, grouped by where they come from.

Every message says what was wrong and what to do about it. All are ``ValueError`` subclasses
through :class:`AgentError`, so the command-line tools print them as one line instead of a
traceback. Errors of the wire contract (bundles, profiles, manifests) live in
:mod:`protocol.errors`; this module holds only what the device side itself raises.
"""

from __future__ import annotations

from pathlib import Path


class AgentError(ValueError):
    """Base class of the agent's own errors."""


# --- model runtimes (agent.runtimes) -------------------------------------------------------------


class RuntimeUnavailableError(AgentError):
    """The runtime a model needs is not installed on this device."""


class ModelLoadError(AgentError):
    """A model file cannot be loaded: missing, empty, corrupt, of the wrong format, or its
    input/output signature is not the expected one. The message names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[ModelLoadError], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


class BatchError(AgentError):
    """A batch handed to ``predict`` does not fit the model's input signature."""


class InferenceError(AgentError):
    """The runtime failed while running a valid batch through a loaded model."""


# --- telemetry outbox and MQTT link (agent.outbox, agent.mqtt_link) -----------------------------


class OutboxError(AgentError):
    """The telemetry outbox cannot be opened or written (wrong device, disk full, report too
    large). The message names the database file and what to do."""


class LinkError(AgentError):
    """The MQTT link was used wrongly (e.g. started twice, or a bad subscription filter)."""
