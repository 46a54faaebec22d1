"""pgsidecar: observability sidecar and PostgreSQL pooling proxy."""
from setuptools import Extension, setup

setup(
    name="pgsidecar",
    version="0.1.0",
    description="Observability sidecar and PostgreSQL wire-protocol pooling proxy",
    python_requires=">=3.11",
    packages=["agent", "agent.webhooks", "proxy", "config", "graphql_gateway", "migrations", "migrations.versions"],
    package_data={"config": ["*.yaml", "*.yml"], "migrations": ["script.py.mako"],
                  "graphql_gateway": ["schema.graphql", "static/*"]},
    install_requires=[
        "aiohttp>=3.9",
        "asyncpg>=0.29",
        "prometheus-client>=0.20",
        # The version the gateway is tested with: its row executor and parser limits use graphql-core
        # internals that changed within 3.2.x (3.2.14: handle_field_error, the parser depth limit).
        "graphql-core==3.2.8",
        "aiodataloader>=0.4",  # the GraphQL gateway's batch loaders
        "sqlparse>=0.5",
        "pyyaml>=6",
        "psutil>=5.9",
        "alembic>=1.13",
        "psycopg[binary]>=3.1",  # the migrations' driver (SQLAlchemy postgresql+psycopg)
        "pglast>=6",
        "scramp>=1.4",
        "cachetools>=5",
        "pgserver>=0.1.4",
        "uvloop>=0.19; platform_system != 'Windows'",
        "standardwebhooks>=1.0",  # webhook signatures (issue 7)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-aiohttp>=1.0",
            "pytest-asyncio>=0.23",
            "pytest-timeout>=2.3",
            "psycopg[binary]>=3.3.9",  # bundles libpq 18, the first that asks for protocol 3.2
            "psycopg2-binary>=2.9",
            "sqlalchemy[asyncio]>=2.0",  # the asyncio extra brings greenlet (sqlalchemy.ext.asyncio)
            "hypothesis>=6",
            "jsonschema>=4.18",  # tests/unit/test_compose.py: the Compose specification schema
            "mypy>=1.8",
            "types-PyYAML",
        ],
    },
    # The relay's framing loop in C (proxy/frames.py has its Python twin, used when this cannot
    # be built: a machine without a C compiler still installs, with a warning).
    ext_modules=[Extension("proxy._speedups", ["proxy/_speedups.c"], optional=True)],
    entry_points={"console_scripts": ["pgsidecar=agent.cli:main"]},
)
