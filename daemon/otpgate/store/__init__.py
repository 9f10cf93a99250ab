"""Adapters of core.ports.Store: SQLite (embedded) today, PostgreSQL next."""
