"""The database's schema history: one module per migration, applied in number order.

To change the schema, add a module ``mNNNN_what.py`` with the next free number and a function
``migrate(db: sqlite_utils.Database) -> None``. :func:`fleet.store.migrate` discovers it, runs it
once inside a ``BEGIN IMMEDIATE`` transaction (foreign keys off, checked afterwards) and records
it in the ``migrations`` table. Write it idempotently (``CREATE ... IF NOT EXISTS``,
:func:`fleet.store.ensure_column`) and never edit a migration that has shipped: add another.
"""
