"""The deletion-request API: apps ask the coordinator to forget a subject and follow it.

`status` (the order a request moves in), `records` (the plain data), `tables`
and `store` (durable requests over SQLite or PostgreSQL, shared with the
coordinator's propagation loop), `access` (per-app tokens and scopes),
`wire` (records <-> `lethe.v1` messages), `service` (the gRPC server),
`client` (for commands and scripts) and `layout` (its files in a data
directory). Receipts are signed with `shared.receipts`.
"""
