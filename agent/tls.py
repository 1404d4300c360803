"""TLS on the device: the contexts for the broker and the fleet.

The CA pinned at provisioning (``trust/ca.pem``, from the enrollment) verifies the broker and an
``https://`` fleet URL; without one the system's CA store does. With a client certificate
(``tls.pem`` for the key ``tls.key`` made at provisioning, :mod:`agent.provision`) the broker
context presents it for mutual TLS.

This module builds contexts only (standard library ``ssl``: ``edge-agent run`` must not carry
``cryptography``); it opens no connection and writes no file.
"""

from __future__ import annotations

import ssl

from agent.config import ConfigError, DeviceConfig, MqttConfig


def _context(ca_file: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the CA file {ca_file!r} ({exc}); re-provision or fix the path"
        ) from None


def mqtt_context(mqtt: MqttConfig) -> ssl.SSLContext | None:
    """The broker's TLS context (pinned CA, client certificate if any), or None without TLS."""
    if not mqtt.tls:
        return None
    context = _context(mqtt.ca_file)
    if mqtt.cert_file:
        try:
            context.load_cert_chain(mqtt.cert_file, mqtt.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the client certificate {mqtt.cert_file} ({exc}); re-provision"
            ) from None
    return context


def https_context(device: DeviceConfig) -> ssl.SSLContext | None:
    """The context for an ``https://`` fleet URL (pinned CA), or None for plain HTTP."""
    if not device.fleet_url.startswith("https://"):
        return None
    return _context(device.ca_file)
