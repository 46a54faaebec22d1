"""The PostgreSQL wire-protocol pooling proxy: codec, auth, server connections, pools,
client sessions and the listener. Imports nothing from agent/ or graphql_gateway/."""
