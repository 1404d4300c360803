"""Subcommands of ``fleet``: one module per group, each with ``register(subparsers)``."""
