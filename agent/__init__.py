"""The agent: command line, HTTP endpoints (health, metrics, APIs) around the proxy."""
