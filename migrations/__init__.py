"""Alembic migrations of the recruiter database: schema, the seed's indices, materialized views
and the result cache's invalidation trigger (issue 6).

``migrations.runner`` builds the Alembic config in code (no alembic.ini) and is what
``pgsidecar migrate`` calls; ``env.py`` takes the DSN from the proxy's settings
(``upstream.dsn`` / ``DATABASE_URL``) and holds a PostgreSQL advisory lock for the whole run.
"""
