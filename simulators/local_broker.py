"""The broker for a local run (the demo, a developer's fleet): Mosquitto when it is installed,
else the embedded pure-Python broker, so the demo works anywhere Python does.

It only chooses and starts; the brokers themselves are :mod:`simulators.broker` and
:mod:`simulators.embedded_broker`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from simulators.broker import BrokerError, MosquittoBroker
from simulators.embedded_broker import EmbeddedBroker

log = logging.getLogger(__name__)

Broker = MosquittoBroker | EmbeddedBroker


def start_broker(data_dir: Path, *, host: str = "127.0.0.1", port: int = 0) -> Broker:
    """A started broker on ``host:port`` (a free port when 0): Mosquitto when its binary is
    found (config, log and persistence in ``data_dir``), else :class:`EmbeddedBroker` (state in
    memory). Both have ``host``, ``port``, ``start``/``stop``/``restart``, ``running`` and
    ``with``; stop it when done."""
    try:
        mosquitto = MosquittoBroker(data_dir, host=host, port=port)
    except BrokerError:  # the binary is not installed
        embedded = EmbeddedBroker(host=host, port=port)
        embedded.start()
        log.warning(
            "mosquitto is not installed: using the embedded MQTT broker on %s:%d (in memory, "
            "no authentication; install mosquitto for a production-like broker)",
            embedded.host,
            embedded.port,
        )
        return embedded
    mosquitto.start()
    log.info("using mosquitto on %s:%d (data in %s)", mosquitto.host, mosquitto.port, data_dir)
    return mosquitto
