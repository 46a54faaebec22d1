"""Alembic revisions, applied in order 0001 -> 0004 (each with an exact downgrade)."""
