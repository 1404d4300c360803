"""Subcommands of ``edge-agent``: one module per group, each with ``register(subparsers)``."""
