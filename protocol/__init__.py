"""The wire contract shared by the agent and the fleet manager.

Everything here is pure: it takes bytes, values or frozen dataclasses and returns values or
raises :mod:`protocol.errors` exceptions. No network, no runtimes, no FastAPI, no files
(callers read the files and hand over the bytes).
"""
