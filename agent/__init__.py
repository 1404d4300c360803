"""The device agent: runtimes, inference service, drift, telemetry, updates, health endpoint.

Imports nothing of ``fleet`` and no FastAPI: it must stay light enough for a Raspberry Pi.
"""
